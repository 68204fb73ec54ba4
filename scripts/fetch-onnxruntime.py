#!/usr/bin/env python3
"""Provide ONNX Runtime's shared library for Ferry, from the official wheel on PyPI.

    python3 scripts/fetch-onnxruntime.py DEST_DIR

Downloads the pinned `onnxruntime` wheel with pip (no install), checks its sha256,
and unpacks `libonnxruntime.so` and `libonnxruntime_providers_shared.so` into
DEST_DIR. `cargo build` runs this (build.rs) and puts the library beside the
`ferry` binary; run it by hand to provision another place, then point Ferry at it
with `ORT_DYLIB_PATH` or `ferry serve --ort-library`.
Uses only the standard library and pip. Idempotent: does nothing when the
library is already there.
"""

import hashlib
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERSION = "1.32.0"
# (machine) -> (wheel platform tag, sha256 of the wheel)
WHEELS = {
    "x86_64": (
        "manylinux_2_28_x86_64",
        "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d",
    ),
}
PYTHON_TAG = "311"  # the library inside does not depend on Python; pin one wheel
LIBS = {
    f"onnxruntime/capi/libonnxruntime.so.{VERSION}": "libonnxruntime.so",
    "onnxruntime/capi/libonnxruntime_providers_shared.so": "libonnxruntime_providers_shared.so",
}


def fail(msg):
    print(f"fetch-onnxruntime: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 2:
        fail("usage: fetch-onnxruntime.py DEST_DIR")
    dest = pathlib.Path(sys.argv[1])
    if all((dest / name).exists() for name in LIBS.values()):
        return
    machine = platform.machine()
    if sys.platform != "linux" or machine not in WHEELS:
        fail(
            f"no pinned onnxruntime wheel for {sys.platform}/{machine}; "
            "install ONNX Runtime 1.32 yourself and set ORT_DYLIB_PATH to libonnxruntime"
        )
    plat, digest = WHEELS[machine]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", f"onnxruntime=={VERSION}",
            "--no-deps", "--only-binary=:all:", "--platform", plat,
            "--python-version", PYTHON_TAG, "--implementation", "cp", "--abi", f"cp{PYTHON_TAG}",
            "--disable-pip-version-check", "--quiet", "-d", tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            fail(f"pip download failed ({' '.join(cmd)}):\n{done.stderr.strip()}")
        wheels = list(pathlib.Path(tmp).glob("onnxruntime-*.whl"))
        if len(wheels) != 1:
            fail(f"expected one onnxruntime wheel from pip, found {wheels}")
        got = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if got != digest:
            fail(f"{wheels[0].name} has sha256 {got}, expected {digest}; refusing to use it")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            for member, name in LIBS.items():
                part = dest / f".{name}.part"
                with z.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
                part.chmod(0o755)
                part.replace(dest / name)
    print(f"fetch-onnxruntime: ONNX Runtime {VERSION} unpacked into {dest}")


if __name__ == "__main__":
    main()
