"""Every test runs against the etcd that ``make setup`` unpacked (scripts/install-etcd.sh: 3.5.30 from Debian sid).

The Makefile puts ``.tools/etcd/usr/bin`` first on PATH; this does the same for a bare ``pytest`` run, so a
machine's own etcd (bookworm's 3.4.23, which has no ``etcdutl``) is never picked up by mistake.
"""

from __future__ import annotations

import os
from pathlib import Path

ETCD_BIN = Path(__file__).resolve().parent.parent / ".tools" / "etcd" / "usr" / "bin"

if ETCD_BIN.is_dir() and str(ETCD_BIN) not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = f"{ETCD_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
