"""Where stage inputs come from and outputs go: local paths (``file://`` allowed) and ``s3://`` URIs.

Every stage goes through these few functions, so a stage never knows which backend it talks to:

- ``local_path(uri)``: a local ``Path`` for an input file or directory. An s3:// file or prefix is
  downloaded once into a cache (``set_cache_dir`` / ``$LF2_CACHE_DIR`` / ``~/.cache/lf2``), keyed by the
  URI and the objects' ETags, and committed to the cache atomically.
- ``output_dir(uri, owner)``: context manager giving a local scratch directory; on success its contents
  are committed to ``uri`` as stage ``owner``'s output, ``_COMPLETE`` last; on failure nothing new is
  committed. lf2 never deletes what it did not write (``outputs``; docs/reliability.md).
- ``read_bytes / write_bytes / exists / version / join / is_complete / list_files / upload_file / remove_files /
  read_npz``.

The package: ``uri`` (locations), ``local`` (the file system: atomic writes, ordinary permissions),
``s3`` (boto3, bounded retries naming the endpoint: the only module that imports boto3), ``cache``
(where s3:// inputs are downloaded), ``api`` (the backend-neutral functions), ``outputs`` (stage
outputs and their ownership).
"""

from .api import exists, list_files, local_path, read_bytes, read_npz, remove, upload_file, version, write_bytes
from .cache import cache_dir, set_cache_dir
from .outputs import (COMPLETE_MARKER, CONTROL_FILES, OWNER_FILE, claim_output, copy_tree, is_complete, output_dir,
                      overwrite_allowed, present_files, remove_files, set_overwrite)
from .s3 import S3_SETTINGS, s3_endpoint, s3_setting
from .uri import is_remote, join, local_of, split_s3

__all__ = [
    "COMPLETE_MARKER", "CONTROL_FILES", "OWNER_FILE", "S3_SETTINGS", "cache_dir", "claim_output", "copy_tree",
    "exists", "is_complete", "is_remote", "join", "list_files", "local_of", "local_path", "output_dir",
    "overwrite_allowed", "present_files", "read_bytes", "read_npz", "remove", "remove_files", "s3_endpoint",
    "s3_setting", "set_cache_dir", "set_overwrite", "split_s3", "upload_file", "version", "write_bytes",
]
