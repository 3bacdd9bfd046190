"""Every test runs against the etcd that ``make setup`` unpacked (scripts/install-etcd.sh: 3.5.30 from Debian sid).

The Makefile puts ``.tools/etcd/usr/bin`` first on PATH; this does the same for a bare ``pytest`` run, so a
machine's own etcd (bookworm's 3.4.23, which has no ``etcdutl``) is never picked up by mistake.
"""

from __future__ import annotations

import os
from pathlib import Path

ETCD_BIN = Path(__file__).resolve().parent.parent / ".tools" / "etcd" / "usr" / "bin"

# jsii silences its Node end-of-life banner only when this holds the Node major version (measured: "1" does not);
# set before anything imports aws_cdk (the jsii runtime reads it when it starts).
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

if ETCD_BIN.is_dir() and str(ETCD_BIN) not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = f"{ETCD_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
