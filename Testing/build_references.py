"""Builds the reference models the suite uses, ahead of the tests that need them.

scripts/test.sh starts this beside pytest (at the lowest priority), into the same $SEGMENTMBTFE_REFERENCE_CACHE:
the session uses about one of the machine's two cores, and the builds (nnU-Net planning, preprocessing and
training, v1's too: minutes in all) take the other. The order is the order the suite first needs them. Nothing here decides what a test
sees: each test still asks for its model through the same builders (conftest.py), which return a finished build,
wait for one in progress (build_lock.py) or build it themselves when this has not reached it yet. A failed build
here is only logged: the test that needs the model builds it again and fails with nnU-Net's own message.

    python Testing/build_references.py ROOT
"""
import os
import sys
import time
import traceback
from pathlib import Path

import nnunet_reference as ref
import nnunet_v1_reference as v1ref
import nnunet_zip


def build_steps(root: Path, data: Path) -> list:
    """(name, build) in the order the suite first needs them: the Slicer suite and the model commands use hippo3d
    and its zip; then test_more_networks, test_nnunet_reference, test_nnunet_trainers, test_nnunet_v1, test_parity."""
    def v2(kind):
        return kind, lambda: ref.make_model_folder(root, kind=kind, data_dir=data)

    def v1(kind):
        return f"v1 {kind}", lambda: v1ref.make_v1_model_folder(root / "nnunet_v1", kind=kind, data_dir=data)
    zip_step = ("hippo3d zip", lambda: nnunet_zip.export_zip(root, ref.make_model_folder(root, kind="hippo3d",
                                                                                          data_dir=data)))
    steps = [v2("hippo3d"), zip_step]
    steps += [v2(kind) for kind in (*ref.NETWORK_KINDS, *ref.KINDS, *ref.NNUNET_TRAINER_KINDS)]
    steps += [v1(kind) for kind in v1ref.KINDS] if v1ref.v1_installed() else []
    return steps + [v2(kind) for kind in ref.PIPELINE_KINDS]


def main(root: str) -> int:
    os.setsid()  # a process group of its own, which scripts/test.sh ends (with nnU-Net's processes) when the tests end
    data = ref.DEFAULT_DATA_DIR
    for name, build in build_steps(Path(root).resolve(), data):
        started = time.perf_counter()
        try:
            build()
            print(f"build_references: {name} ready ({time.perf_counter() - started:.0f} s)", flush=True)
        except Exception:  # noqa: BLE001 - the test needing it builds it again and reports the failure
            print(f"build_references: {name} failed; the test that needs it builds it again:\n"
                  f"{traceback.format_exc()[-2000:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
