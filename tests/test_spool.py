import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailpool.framework.spool import Envelope, Spool, SpoolError
from mailpool.fsutil import fsync_dir, syncfs, write_file_durably


def make_env(spool: Spool, **kw) -> Envelope:
    fields = dict(
        queue_id=spool.new_queue_id(),
        message_id="abc@example.org",
        originator="alice@example.org",
        recipients=["bob@example.net", "carol@example.net"],
        received_ns=time.time_ns(),
    )
    fields.update(kw)
    return Envelope(**fields)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_layout(spool: Spool) -> None:
    for d in ("tmp", "state", *Spool.QUEUES):
        assert (spool.root / d).is_dir()


def test_store_load_round_trip(spool: Spool) -> None:
    env = make_env(spool, peer_ip="192.0.2.1", helo="mx.example.org", size=11, attempts=2)
    content = b"Subject: x\r\n\r\nhello\r\n" + bytes(range(256))
    path = spool.store("incoming", env, content)
    assert path == spool.root / "incoming" / env.queue_id
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    got_env, got = spool.load("incoming", env.queue_id)
    assert got_env == env
    assert got == content
    assert spool.load_envelope("incoming", env.queue_id) == env
    assert os.listdir(spool.tmp) == []


def test_store_empty_content_and_null_sender(spool: Spool) -> None:
    env = make_env(spool, originator="", message_id="")
    spool.store("hold", env, b"")
    assert spool.load("hold", env.queue_id) == (env, b"")


def test_store_replaces_same_id(spool: Spool) -> None:
    env = make_env(spool)
    spool.store("retry1", env, b"body")
    bumped = Envelope(**{**{f: getattr(env, f) for f in env.__struct_fields__}, "attempts": 1})
    spool.store("retry1", bumped, b"body")
    assert spool.load_envelope("retry1", env.queue_id).attempts == 1
    assert spool.list("retry1") == [env.queue_id]


def test_missing_message(spool: Spool) -> None:
    with pytest.raises(FileNotFoundError):
        spool.load("incoming", spool.new_queue_id())


def test_bad_names(spool: Spool) -> None:
    env = make_env(spool)
    with pytest.raises(ValueError):
        spool.store("nosuchqueue", env, b"x")
    for bad in ("../x", "a/b", "", ".hidden", "a.b"):
        with pytest.raises(ValueError):
            spool.load("incoming", bad)
        with pytest.raises(ValueError):
            spool.store("incoming", make_env(spool, queue_id=bad), b"x")


def test_ids_unique_and_time_ordered(spool: Spool) -> None:
    ids = [spool.new_queue_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for i in ids[:10]:
        assert len(i) == 22 and i.isalnum() and i == i.lower()


IDS_SCRIPT = """
import sys
from mailpool.framework.spool import Spool
s = Spool(sys.argv[1])
sys.stdout.write("\\n".join(s.new_queue_id() for _ in range(5000)))
"""


def test_ids_unique_across_processes(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", IDS_SCRIPT, str(tmp_path / "s")],
            stdout=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    all_ids: list[str] = []
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0
        ids = out.decode().split()
        assert len(ids) == 5000
        assert ids == sorted(ids)
        all_ids += ids
    # and ids from this process, made after the others
    all_ids += [Spool(tmp_path / "s").new_queue_id() for _ in range(100)]
    assert len(set(all_ids)) == len(all_ids)


def test_list_oldest_first(spool: Spool) -> None:
    envs = [make_env(spool) for _ in range(20)]
    shuffled = envs[:]
    random.Random(1).shuffle(shuffled)
    for e in shuffled:
        spool.store("outbound", e, b"x", sync=False)
    # stray entries that are not messages are ignored
    (spool.root / "outbound" / ".junk").write_bytes(b"")
    assert spool.list("outbound") == [e.queue_id for e in envs]
    assert spool.list("incoming") == []


def test_move(spool: Spool) -> None:
    env = make_env(spool)
    spool.store("incoming", env, b"data")
    spool.move(env.queue_id, "incoming", "outbound")
    assert spool.list("incoming") == []
    assert spool.list("outbound") == [env.queue_id]
    assert spool.find(env.queue_id) == "outbound"
    assert spool.load("outbound", env.queue_id) == (env, b"data")
    # repeating a move that already happened (crash recovery) is harmless
    spool.move(env.queue_id, "incoming", "outbound")
    assert spool.list("outbound") == [env.queue_id]
    with pytest.raises(FileNotFoundError):
        spool.move(env.queue_id, "retry1", "retry2")
    assert spool.find(spool.new_queue_id()) is None


def test_remove(spool: Spool) -> None:
    env = make_env(spool)
    spool.store("incoming", env, b"data")
    spool.remove("incoming", env.queue_id)
    assert spool.list("incoming") == []
    spool.remove("incoming", env.queue_id)  # idempotent


def test_remove_takes_only_its_queues_state(spool: Spool) -> None:
    # A forwarded message keeps its queue id on the outbound queue, with the client's state.
    env = make_env(spool)
    spool.store("incoming", env, b"data")
    spool.store("outbound", env, b"data")
    (spool.state / env.queue_id).write_bytes(b"state")
    spool.remove("incoming", env.queue_id)
    assert (spool.state / env.queue_id).exists()
    spool.remove("outbound", env.queue_id)
    assert not (spool.state / env.queue_id).exists()



def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[:-3]
    elif how == "flip_content":
        data[-1] ^= 0xFF
    elif how == "flip_envelope":
        data[30] ^= 0xFF
    elif how == "magic":
        data[0:4] = b"XXXX"
    elif how == "version":
        data[4] = 99
    elif how == "short":
        data = data[:10]
    elif how == "extra":
        data += b"tail"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["truncate", "flip_content", "flip_envelope", "magic", "version", "short", "extra"]
)
def test_damaged_file(spool: Spool, how: str) -> None:
    env = make_env(spool)
    path = spool.store("incoming", env, b"Subject: hi\r\n\r\nbody\r\n")
    damage(path, how)
    with pytest.raises(SpoolError) as exc:
        spool.load("incoming", env.queue_id)
    assert env.queue_id in str(exc.value)
    if how != "flip_content":
        with pytest.raises(SpoolError):
            spool.load_envelope("incoming", env.queue_id)


def test_file_under_wrong_name(spool: Spool) -> None:
    env = make_env(spool)
    path = spool.store("incoming", env, b"x")
    other = spool.new_queue_id()
    os.rename(path, spool.root / "incoming" / other)
    with pytest.raises(SpoolError, match="names queue id"):
        spool.load("incoming", other)


CRASH_SCRIPT = """
import os, sys
from pathlib import Path
# what a job dying in the middle of DATA leaves behind
Path(sys.argv[1], "tmp", f"abc.{os.getpid()}.0011aabb").write_bytes(b"partial")
os._exit(1)
"""


def test_cleanup_tmp(spool: Spool) -> None:
    subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(spool.root)], check=False)
    (spool.tmp / "garbage").write_bytes(b"x")
    # one still being written by a live process (this one) is kept
    live = spool.tmp / f".def.{os.getpid()}.00112233.tmp"
    live.write_bytes(b"in progress")
    env = make_env(spool)
    spool.store("incoming", env, b"ok")
    assert len(os.listdir(spool.tmp)) == 3
    assert spool.cleanup_tmp() == 2
    assert os.listdir(spool.tmp) == [live.name]
    # unless it is far too old to be a write in progress (pid reused)
    assert spool.cleanup_tmp(max_age=0) == 1
    assert os.listdir(spool.tmp) == []
    assert spool.load("incoming", env.queue_id) == (env, b"ok")
    assert spool.cleanup_tmp() == 0


def test_store_without_sync_then_syncfs(spool: Spool) -> None:
    envs = [make_env(spool) for _ in range(50)]
    for i, e in enumerate(envs):
        spool.store("incoming", e, b"message %d" % i, sync=False)
    syncfs(spool.root)
    assert spool.list("incoming") == [e.queue_id for e in envs]
    for i, e in enumerate(envs):
        assert spool.load("incoming", e.queue_id) == (e, b"message %d" % i)


def test_fsutil(tmp_path: Path) -> None:
    p = write_file_durably(tmp_path, "f.bin", b"one")
    assert p.read_bytes() == b"one"
    write_file_durably(tmp_path, "f.bin", memoryview(b"two"), sync=False)
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.bin"]
    fsync_dir(tmp_path)
    syncfs(tmp_path)
    syncfs(p)
    with pytest.raises(FileNotFoundError):
        syncfs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        write_file_durably(tmp_path / "missing", "f", b"x")
