"""The engine never touches the network: models, WordNet and the class-name cache all come from disk.

A fresh interpreter has every socket entry point replaced by one that raises, and an empty cache folder,
so that WordNet is set up and the ImageNet class names are embedded from scratch, offline.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, socket, sys

    attempts = []

    def _blocked(what):
        def refuse(*args, **kwargs):
            attempts.append(what)
            raise RuntimeError(f"network access attempted: {what} {args[:2]!r}")
        return refuse

    socket.socket.connect = _blocked("socket.connect")
    socket.socket.connect_ex = _blocked("socket.connect_ex")
    socket.create_connection = _blocked("socket.create_connection")
    socket.getaddrinfo = _blocked("socket.getaddrinfo")

    cache = sys.argv[1]
    os.environ["OVSEG_CACHE_DIR"] = cache
    assert not os.listdir(cache)

    from ovseg.core.predictor import Predictor

    p = Predictor(device="cpu")
    p.set_image(sys.argv[2])
    out = p.predict("cup, spoon, zorblax")
    assert [r.concept for r in out.results] == ["cup", "spoon", "zorblax"], out.results
    for r in out.results:
        assert r.mask.shape == (400, 600), r.mask.shape
    # the from-scratch setup really happened, in the fresh cache
    assert os.path.isfile(os.path.join(cache, "nltk_data", "corpora", "wordnet", ".complete"))
    assert os.listdir(os.path.join(cache, "text")), "the class-name embeddings were not cached"
    if attempts:
        # an attempt that some library caught and swallowed still counts
        print("ATTEMPTS", attempts)
        sys.exit(3)
    print("OK", round(out.get("cup").score, 4))
    """
)


def test_predictor_runs_with_the_network_cut_off(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "OVSEG_CACHE_DIR"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache), str(ROOT / "assets" / "examples" / "coffee.jpg")],
        cwd=tmp_path,  # not the checkout: the installed package must work from anywhere
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "OK" in proc.stdout
    assert "network access attempted" not in proc.stderr
