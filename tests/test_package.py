"""The installable package: lazy imports, and one clear message without TensorFlow."""

from __future__ import annotations

import configparser
import json
import os

from conftest import REPO, run_python

import shopee_tpu


def test_version_matches_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    assert shopee_tpu.__version__ == cfg["metadata"]["version"]


def test_import_needs_neither_tensorflow_nor_keras():
    out = run_python(
        "import sys, shopee_tpu\n"
        "cfg = shopee_tpu.RunConfig.preset('demo')\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_the_modules_behind_commands_leave_the_backend_open():
    # connect() picks JAX on a TPU VM only while Keras is not imported: importing
    # what a command or a notebook calls must not start it.
    out = run_python(
        "import sys\n"
        "import shopee_tpu.cli, shopee_tpu.training, shopee_tpu.demo\n"
        "import shopee_tpu.inference.run, shopee_tpu.experiments.kfold\n"
        "import shopee_tpu.experiments.sweep\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_without_tensorflow_the_package_works_and_says_how_to_install_it(tmp_path):
    # A directory first on PYTHONPATH whose `tensorflow` fails to import, exactly
    # like a machine without TensorFlow; Keras itself runs on JAX there.
    fake = tmp_path / "no_tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorflow'\")\n"
    )
    code = r"""
import json, sys
import shopee_tpu
from shopee_tpu.cli import main
from shopee_tpu.utils import require_tensorflow

result = {"version": shopee_tpu.__version__}
result["cli_status"] = main(["config", "--preset", "demo", "--set", "epochs=2"])
for name, call in [
    ("require", require_tensorflow),
    ("connect_tf", lambda: shopee_tpu.connect(backend="tensorflow")),
]:
    try:
        call()
        result[name] = None
    except ImportError as e:
        result[name] = str(e)
acc = shopee_tpu.connect(verbose=False)  # KERAS_BACKEND=jax needs no TensorFlow
result.update(backend=acc.backend, replicas=acc.replicas,
              tensorflow_loaded="tensorflow" in sys.modules)
print("RESULT " + json.dumps(result))
"""
    env = {
        "PYTHONPATH": os.pathsep.join([str(fake.parent), REPO]),
        "KERAS_BACKEND": "jax",
        "SHOPEE_TPU_DEVICE": "auto",
    }
    out = run_python(code, env=env, timeout=180)

    result = json.loads(out.split("RESULT ", 1)[1])
    printed_config = json.loads(out.split("RESULT ", 1)[0])
    assert result["cli_status"] == 0 and printed_config["epochs"] == 2
    for name in ("require", "connect_tf"):
        assert result[name] is not None, f"{name} did not raise ImportError"
        assert "pip install shopee_tpu[cpu]" in result[name]
    assert (result["backend"], result["replicas"]) == ("jax", 1)
    assert not result["tensorflow_loaded"]


def test_every_import_is_declared_and_optional_ones_name_their_extra():
    """Each third-party module the package imports comes from a requirement in
    setup.cfg: a core one, or an extra whose module the one-line error maps to it."""
    import ast
    import importlib.metadata
    import re
    import sys

    from shopee_tpu.console import EXTRAS

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))

    def names(text):
        reqs = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return {re.split(r"[<>=!\[; ]", r)[0].lower().replace("_", "-") for r in reqs}

    core = names(cfg["options"]["install_requires"])
    extras = {k: names(v) for k, v in cfg["options.extras_require"].items()}
    dists = importlib.metadata.packages_distributions()
    imported = set()
    for folder, _, files in os.walk(os.path.join(REPO, "shopee_tpu")):
        for name in files:
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, name)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        imported.update(a.name.split(".")[0] for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"shopee_tpu"}
    assert {"PIL", "h5py", "keras", "numpy"} <= third_party
    for module in sorted(third_party):
        provided = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert provided, f"{module} is imported but not installed"
        if provided & core:
            continue
        in_extras = [e for e, reqs in extras.items() if provided & reqs]
        assert in_extras, f"{module} ({provided}) is in no requirement of setup.cfg"
        assert module in EXTRAS and EXTRAS[module][1] in in_extras, (
            f"{module} comes with the extras {in_extras}; shopee_tpu.console.EXTRAS "
            "must map it there so a missing install gets a one-line hint"
        )
