"""Downloads a published file once into a cache, checking its SHA-256.

torchvision's (and torch.hub's) convention: the hex group after the last '-'
of a file's name begins its SHA-256 (``resnet50-0676ba61.pth``). A download
goes to a temporary name and is renamed only when complete and matching;
offline, the one-line error names the URL and where to put the file by hand.
"""

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request

import tqdm

from dtq_jax.infra import files

HASH_REGEX = re.compile(r'-([a-f0-9]*)\.')
# Marks a file of converted variables (safetensors metadata 'format').


class DownloadError(OSError):
  """A checkpoint could not be downloaded (offline, unreachable, ...)."""


class HashMismatchError(ValueError):
  """A checkpoint's SHA-256 does not start with the prefix in its name."""


def expected_sha256_prefix(filename):
  """The hash prefix torch.hub reads from a file name ('' if none)."""
  match = HASH_REGEX.search(os.path.basename(filename))
  return match.group(1) if match else ''


def sha256_file(path):
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def check_hash(digest, filename, source):
  """Raises HashMismatchError unless ``digest`` starts with the name's hash.

  Args:
    digest: hex SHA-256 of the file.
    filename: its name (the hash prefix follows the last '-').
    source: where it came from, for the message.
  """
  prefix = expected_sha256_prefix(filename)
  if prefix and not digest.startswith(prefix):
    raise HashMismatchError(
        f'{source}: SHA-256 {digest} does not start with {prefix!r} (from '
        f'the file name); the file is corrupt or not the published one.')


def download(url, cache_dir, progress=True, timeout=60.0):
  """Downloads ``url`` into ``cache_dir`` once, checking its hash prefix.

  Args:
    url: checkpoint URL; the hex group after '-' in its file name must begin
      the file's SHA-256 (torchvision's convention).
    cache_dir: folder for the file.
    progress: show a tqdm progress bar.
    timeout: seconds to wait for the server.

  Returns:
    Path of the downloaded (or already present) file. A present file is
    returned as is; ``load_torchvision`` checks its hash before converting.

  Raises:
    DownloadError: the URL cannot be reached; the one-line message names the
      URL and where to put the file by hand.
    HashMismatchError: the downloaded bytes do not match the name's hash.
  """
  filename = os.path.basename(urllib.parse.urlparse(url).path)
  dest = os.path.join(cache_dir, filename)
  if os.path.isfile(dest):
    return dest
  os.makedirs(cache_dir, exist_ok=True)

  def offline(reason):
    return (f'Cannot download {url} ({reason}); offline? Download it '
            f'elsewhere and place it at {dest}')

  try:
    # pylint: disable-next=consider-using-with
    response = urllib.request.urlopen(url, timeout=timeout)
  except (urllib.error.URLError, OSError, ValueError) as e:
    # One line, no chained traceback: the message says all there is to do.
    raise DownloadError(offline(getattr(e, 'reason', None) or e)) from None
  digest = hashlib.sha256()
  with files.atomic_path(dest) as tmp:
    total = response.headers.get('Content-Length')
    with response, open(tmp, 'wb') as f, tqdm.tqdm(
        total=int(total) if total else None, unit='B', unit_scale=True,
        unit_divisor=1024, desc=filename, disable=not progress) as bar:
      while True:
        try:
          chunk = response.read(1 << 20)
        except OSError as e:  # connection lost half way
          raise DownloadError(offline(e)) from None
        if not chunk:
          break
        f.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))
    check_hash(digest.hexdigest(), filename, url)
  return dest
