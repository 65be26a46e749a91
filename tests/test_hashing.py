"""hubconv.hashing agrees with hashlib on whole bytes and with git's blob ids, across block boundaries."""

import hashlib
import os

from hubconv.devhub.storage import git_blob_sha1
from hubconv.hashing import git_blob_id, sha256_file


def test_digests_match_whole_buffer_digests(tmp_path):
    for size in (0, 1, 4099, 3 * 4099 + 7):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(str(path), block=4099) == hashlib.sha256(data).hexdigest()
        assert git_blob_id(str(path), block=4099) == git_blob_sha1(data)
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_id(str(tmp_path / "hello")) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`
