"""SecAgg+'s masks from a cryptographic XOF (SHAKE-256), in place of Flower's generator.

Why: every mask of Flower 1.42's SecAgg+ (a site's private mask from its 32-byte
seed, each pairwise mask from an ECDH-derived key) comes from ``pseudo_rand_gen``
(``flwr/common/secure_aggregation/secaggplus_utils.py``), which XOR-folds the secret
to 32 bits and expands it with numpy's Mersenne Twister: each mask is one of at most
2**32 streams (a 256-bit secret buys 32 bits), few enough to tabulate, from a
generator that is not cryptographic, where the protocol's security argument (Bell et
al. 2020) assumes a cryptographic PRG. Reported upstream as flwrlabs/flower issue
7522; a fix is proposed in PR 7570, not released in flwr 1.42.0 (:data:`FLWR_CHECKED`).
``tests/test_masks.py`` fails when the installed flwr changes, so whoever upgrades
re-checks whether Flower's own generator is fixed and this patch can go.

:func:`generate` has ``pseudo_rand_gen``'s signature. Its stream is SHAKE-256 (FIPS
202, from ``hashlib``) of a domain-separation label, the mask width and the *whole*
secret (keyed by prefix, as KMAC and the SHAKE-based PRFs of FIPS 203/204 are; no
folding): one squeeze for all arrays of a vector, cut into little-endian words of
ceil(log2(num_range) / 8) bytes (5 for fedscan's 2**40: no squeezed byte wasted,
the XOF is the cost), each keeping its low log2(num_range) bits. ``num_range`` (the
SecAgg+ modulus) is a power of two, so every value in [0, num_range) is equally
likely (Flower's draws [0, num_range - 1)). Anything else is refused.

:func:`install` points one of Flower's functions at :func:`generate` and checks
that the function still looks the generator up by that global name; the site mod
and the server workflow must both use it (``client/secagg.py``,
``server/secagg.py``), or the server's unmasking no longer cancels the sites'
masks. :data:`GENERATOR` names this construction on the wire: the server
announces it (``secure_aggregation.mask_generator``), sites check it and announce
their own, so a peer on another generator is refused before any masked vector.

Framework-free: hashlib, numpy and the standard library only.
"""

from __future__ import annotations

import dis
import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np

# The generator's name on the wire and in the config (secure_aggregation.mask_generator);
# a new construction gets a new name, never a changed meaning for this one.
GENERATOR = "shake256-v1"
GENERATORS = (GENERATOR,)
DOMAIN = b"fedscan/secaggplus/mask/shake256/v1"
MIN_SECRET_BYTES = 16  # Flower's secrets are 32 bytes (seed) and 44 (base64 of a 32-byte key)
FLOWER_NAME = "pseudo_rand_gen"  # the global name Flower's site mod and workflow call
FLWR_CHECKED = "1.42.0"  # the flwr whose site mod and workflow this patch was read against


def stream_input(seed: bytes, bits: int) -> bytes:
    """What SHAKE-256 absorbs: label, NUL, mask width in bits, secret length, secret.
    Every field before the secret has a fixed length or a terminator, so two
    different (width, secret) pairs never absorb the same bytes."""
    return DOMAIN + b"\x00" + bytes([bits]) + len(seed).to_bytes(8, "little") + seed


def _bits(num_range: int) -> int:
    if (
        isinstance(num_range, bool)
        or not isinstance(num_range, int | np.integer)
        or not 2 <= int(num_range) <= 2**63
        or int(num_range) & (int(num_range) - 1)
    ):
        raise ValueError(
            f"SecAgg+ masks need a modulus that is a power of 2 in [2, 2**63] "
            f"(secure_aggregation.modulus_range), got {num_range!r}"
        )
    return int(num_range).bit_length() - 1


def generate(
    seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """One int64 mask per shape in ``dimensions_list``, uniform in [0, num_range),
    from the SHAKE-256 stream keyed by ``seed`` (Flower's ``pseudo_rand_gen``
    signature; consecutive shapes take consecutive parts of one stream)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) < MIN_SECRET_BYTES:
        raise ValueError(
            f"SecAgg+ mask secret must be at least {MIN_SECRET_BYTES} bytes, "
            f"got {type(seed).__name__} of length {len(seed) if hasattr(seed, '__len__') else '?'}"
        )
    bits = _bits(num_range)
    width = -(-bits // 8)  # bytes per value
    shapes = [tuple(int(n) for n in d) for d in dimensions_list]
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    stream = hashlib.shake_256(stream_input(bytes(seed), bits)).digest(width * total)
    if width in (1, 2, 4):
        words = np.frombuffer(stream, dtype=f"<u{width}")
        values = (words & words.dtype.type(int(num_range) - 1)).astype(np.int64)
    elif width == 8:  # int64 words: keeping the low `bits` (<= 63) bits makes them >= 0
        values = np.frombuffer(stream, dtype="<i8") & np.int64(int(num_range) - 1)
    else:  # 3, 5, 6 or 7 bytes: each word zero-extended to an int64
        padded = np.zeros((total, 8), dtype=np.uint8)
        padded[:, :width] = np.frombuffer(stream, dtype=np.uint8).reshape(total, width)
        values = padded.view("<i8").ravel()
        values &= np.int64(int(num_range) - 1)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(values[start : start + size].reshape(shape))
        start += size
    return out


def looks_up_by_name(function: Callable, name: str) -> bool:
    """Whether ``function``'s own bytecode loads the global ``name`` (so rebinding the
    name in its module changes what it calls)."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    return any(i.opname == "LOAD_GLOBAL" and i.argval == name for i in dis.get_instructions(code))


def install(caller: Callable, where: str) -> None:
    """Make ``caller`` (a function of Flower's that derives masks) use :func:`generate`.

    Rebinds :data:`FLOWER_NAME` in the caller's module and fails loudly unless the
    caller still loads the generator by that global name and now resolves it to
    ours: a Flower release that moves or renames the call would otherwise leave one
    side on the old generator without a word (and the masks would stop cancelling,
    or a site would send Mersenne-Twister masks). Idempotent; process-wide, which is
    what Flower's own name is.
    """
    if not looks_up_by_name(caller, FLOWER_NAME):
        raise RuntimeError(
            f"{where} no longer calls '{FLOWER_NAME}' by its global name: fedscan's "
            f"SecAgg+ mask patch (flwrlabs/flower issue 7522) cannot take effect. It was "
            f"checked against flwr {FLWR_CHECKED}; see fedscan.common.federated.masks"
        )
    caller.__globals__[FLOWER_NAME] = generate
    if caller.__globals__.get(FLOWER_NAME) is not generate:
        raise RuntimeError(f"{where}: '{FLOWER_NAME}' does not resolve to fedscan's generator")


def refusal(announced: object, *, own: str, peer: str, this: str) -> str | None:
    """Why ``peer`` (e.g. "site 7", "the server"), announcing ``announced``, cannot run
    SecAgg+ with ``this`` side, which masks with ``own``; ``None`` when they agree."""
    if announced == own:
        return None
    said = (
        "announces no mask generator (a fedscan from before the SecAgg+ masks were "
        "pinned, or plain Flower: a Mersenne Twister seeded with 32 bits)"
        if announced in (None, "")
        else f"announces mask generator '{announced}'"
    )
    return (
        f"{peer} {said}; {this} masks with '{own}' (secure_aggregation.mask_generator); "
        f"both sides must use the same generator: update {peer}"
    )
