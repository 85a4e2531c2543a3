"""Files written whole or not at all (built under a temporary name beside the target, then renamed into place: a
rename within one file system is atomic), and JSON read with a one-line error."""
import json
import os
import shutil
import tempfile


def atomic_dir(path, write):
    """Call write(tmp) on a new temporary folder beside `path`, then move what it wrote into `path`: the folder is
    renamed into place when `path` does not exist, else each file is renamed over its namesake (other files, e.g. a
    run's metrics.jsonl, are kept). On any error, or a signal, the temporary folder is removed and `path` is as it
    was."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=os.path.dirname(path))
    try:
        write(tmp)
        if os.path.isdir(path):
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
            os.rmdir(tmp)
        else:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path, text: str):
    """`text` into `path` through a temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path):
    """The JSON value in `path`, or None when there is no such file; a one-line ValueError when it is not JSON."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
