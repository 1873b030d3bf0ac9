"""The README's promise 'it never imports nnU-Net': a prediction through the command line and through the
Python API, each in a fresh process (other tests import nnU-Net as the reference), with an import hook that
records every attempt to import `nnunetv2` or `nnunet` (v1), caught or not. nnU-Net is installed in the test
environment (scripts/test.sh), so an import would succeed and be seen in sys.modules as well.
"""
import json
import subprocess
import sys

import pytest

RECORD_NNUNET_IMPORTS = r"""
import importlib.abc, json, sys
attempts = []
class Record(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nnunetv2", "nnunet"):
            attempts.append(name)
        return None  # the import goes on as usual
sys.meta_path.insert(0, Record())
how, model, image, output = sys.argv[1:]
if how == "cli":
    from SegmentMBTFELib import cli
    assert cli.main(["predict", "-m", model, "-i", image, "-o", output]) == 0
else:
    from SegmentMBTFELib import load_model, read_volume
    from SegmentMBTFELib.io.writers import write_prediction
    write_prediction(load_model(model).predict([read_volume(image)]), output)
print(json.dumps({"attempts": attempts,
                  "loaded": [m for m in sys.modules if m.split(".")[0] in ("nnunetv2", "nnunet")]}))
"""


@pytest.mark.parametrize("how", ["cli", "api"])
def test_a_prediction_never_imports_nnunet(models, good_image, tmp_path, how):
    output = tmp_path / "seg.seg.nrrd"
    done = subprocess.run([sys.executable, "-c", RECORD_NNUNET_IMPORTS, how, str(models["one"]), str(good_image),
                           str(output)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert output.is_file()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"attempts": [], "loaded": []}
