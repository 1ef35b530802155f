"""Where files live: local paths or object storage (gs://, s3://), and riding out outages.

`from mmjax import storage`; then `storage.path(...)`, `storage.retry(...)`, ...
"""

from mmjax.storage.paths import (
    SCHEMES,
    bucket_of,
    check_bucket,
    create_exclusive,
    glob,
    is_file,
    is_remote,
    join,
    local_cache,
    local_copy,
    mkdir,
    open_binary,
    path,
    read_bytes,
    read_range,
    read_text,
    scheme,
    stat,
    write_bytes,
    write_text,
)
from mmjax.storage.retry import RETRY_SECONDS, StorageError, retries, retry, transient

__all__ = [
    "glob",
    "is_file",
    "open_binary",
    "read_range",
    "stat",
    "RETRY_SECONDS",
    "SCHEMES",
    "StorageError",
    "bucket_of",
    "check_bucket",
    "create_exclusive",
    "is_remote",
    "join",
    "local_cache",
    "local_copy",
    "mkdir",
    "path",
    "read_bytes",
    "read_text",
    "retries",
    "retry",
    "scheme",
    "transient",
    "write_bytes",
    "write_text",
]
