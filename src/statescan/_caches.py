"""The CPU's cache sizes (Linux sysfs of cpu0, with a fallback for what it does not say): the
facts the tuning model (:mod:`statescan._tuning`) and the compiled kernels' blocking
(:mod:`statescan._dispatch` hands them over when the kernels load) are sized from."""
import os

# Used when sysfs does not say (typical of current x86 and arm64 cores).
FALLBACK = {"l1d": 32 * 1024, "l2": 1024 * 1024}


def parse_size(text):
    """'48K' -> 49152; '2M' -> 2097152; '512' -> 512; None when unreadable."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() else None


def cache_sizes(root="/sys/devices/system/cpu/cpu0/cache"):
    """{'l1d': bytes, 'l2': bytes} of cpu0 (sysfs), with the fallback for what is unreadable."""
    found = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        entries = []
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                size = parse_size(f.read())
        except (OSError, IndexError):
            continue
        if size and level == "1" and kind in ("Data", "Unified"):
            found["l1d"] = size
        elif size and level == "2":
            found["l2"] = size
    return {name: found.get(name, fallback) for name, fallback in FALLBACK.items()}
