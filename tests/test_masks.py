"""SecAgg+'s masks: fedscan's SHAKE-256 generator (known answers, range, bias), the patch
of Flower's site mod and workflow (takes effect, fails loudly when it cannot), and the
site's refusal of a server on another generator. Runs in seconds; the federated runs
that exercise the whole protocol are in ``tests/test_secure.py``."""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
import types

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _collect_masked_vectors,
)
from flwr.common import MessageType, Metadata, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks
from flwr.server.workflow import SecAggPlusWorkflow
from scipy.stats import chisquare

from fedscan.client.secagg import install_site_masks, pinned_secaggplus_mod
from fedscan.common.core.errors import ConfigError
from fedscan.common.federated import masks
from fedscan.common.federated.wire import MASK_GENERATOR
from fedscan.server.secagg import install_server_masks

SEED = bytes(range(32))
# generate(SEED, 2**bits, ...)'s first five values, computed once and kept: a change of the
# construction (label, encoding, word size) must fail here and get a new GENERATOR name
KNOWN = {
    40: [370100284052, 873386228393, 957412437911, 918477911155, 384948101330],  # 5-byte words
    32: [1739007446, 1253523150, 2967708986, 1981332043, 4191533206],  # 4-byte words
    20: [40982, 483509, 595454, 395263, 575352],  # 3-byte words
    63: [  # 8-byte words
        7704373697090719669,
        2263463468739860251,
        8128289603314952111,
        2357465164964781247,
        7229086821073122639,
    ],
}


def _independent(seed: bytes, bits: int, count: int) -> list[int]:
    """The construction from its description, with hashlib and int.from_bytes only:
    SHAKE-256 of label || NUL || bits || len(seed) (8 bytes LE) || seed, read as
    little-endian words of ceil(bits / 8) bytes, low ``bits`` bits kept."""
    width = (bits + 7) // 8
    absorbed = (
        b"fedscan/secaggplus/mask/shake256/v1\x00"
        + bytes([bits])
        + len(seed).to_bytes(8, "little")
        + seed
    )
    out = hashlib.shake_256(absorbed).digest(width * count)
    return [
        int.from_bytes(out[i * width : (i + 1) * width], "little") % 2**bits for i in range(count)
    ]


@pytest.mark.parametrize("bits", sorted(KNOWN))
def test_known_answers_match_an_independent_shake256_computation(bits: int) -> None:
    got = masks.generate(SEED, 2**bits, [(2,), (), (1, 2)])
    assert [a.shape for a in got] == [(2,), (), (1, 2)]
    assert all(a.dtype == np.int64 for a in got)
    flat = [int(v) for a in got for v in a.ravel()]
    assert flat == KNOWN[bits]
    assert flat == _independent(SEED, bits, 5)
    # consecutive shapes take consecutive parts of one stream
    long = masks.generate(SEED, 2**bits, [(1000,)])[0]
    assert long.tolist() == _independent(SEED, bits, 1000)


def test_the_whole_secret_counts_and_masks_differ_from_flowers() -> None:
    """Flower's generator folds the secret to 32 bits: two secrets with the same fold give
    the same Flower masks, and different fedscan masks."""
    other = bytearray(SEED)
    for i in (0, 4):  # flip the same bits in two 4-byte words: the XOR fold is unchanged
        other[i] ^= 0x5A
    other = bytes(other)
    shapes = [(4096,)]
    a, b = flower_masks(SEED, 2**40, shapes)[0], flower_masks(other, 2**40, shapes)[0]
    np.testing.assert_array_equal(a, b)  # the weakness (flwr issue 7522)
    ours_a, ours_b = masks.generate(SEED, 2**40, shapes)[0], masks.generate(other, 2**40, shapes)[0]
    assert (ours_a == ours_b).mean() < 0.01
    assert (ours_a == a).mean() < 0.01  # not Flower's stream for the same seed
    # ... and every byte of a longer secret matters
    longer = SEED + b"\x00" * 12
    assert (masks.generate(longer, 2**40, shapes)[0] == ours_a).mean() < 0.01


def test_values_cover_the_range_without_bias() -> None:
    """num_range = 8: each value 1/8 of the time (Flower's randint never draws 7)."""
    values = masks.generate(SEED, 8, [(80_000,)])[0]
    assert values.min() == 0 and values.max() == 7
    counts = np.bincount(values, minlength=8)
    assert chisquare(counts).pvalue > 1e-4, counts
    big = masks.generate(SEED, 2**63, [(10_000,)])[0]
    assert big.min() >= 0 and big.max() > 2**62  # the top bit of the range is drawn too


@pytest.mark.parametrize(
    ("seed", "num_range"),
    [(SEED, 1000), (SEED, 2**64), (SEED, 1), (SEED, True), (b"short", 2**40), ("text", 2**40)],
)
def test_bad_secrets_and_moduli_are_refused(seed, num_range) -> None:
    with pytest.raises(ValueError, match=r"modulus_range|secret"):
        masks.generate(seed, num_range, [(3,)])


def test_install_fails_loudly_when_the_name_is_not_looked_up() -> None:
    namespace = {"pseudo_rand_gen": flower_masks, "utils": types.SimpleNamespace(pseudo_rand_gen=1)}
    exec(
        "def by_name(s):\n    return pseudo_rand_gen(s, 8, [(2,)])\n"
        "def by_attribute(s):\n    return utils.pseudo_rand_gen(s, 8, [(2,)])\n",
        namespace,
    )
    with pytest.raises(RuntimeError, match="issue 7522"):
        masks.install(namespace["by_attribute"], "by_attribute")
    masks.install(namespace["by_name"], "by_name")
    assert namespace["pseudo_rand_gen"] is masks.generate
    np.testing.assert_array_equal(namespace["by_name"](SEED)[0], masks.generate(SEED, 8, [(2,)])[0])


def test_both_flower_callers_resolve_the_generator_to_fedscans() -> None:
    install_site_masks()
    install_server_masks()
    for caller in (_collect_masked_vectors, SecAggPlusWorkflow.unmask_stage):
        assert masks.looks_up_by_name(caller, "pseudo_rand_gen")
        assert caller.__globals__["pseudo_rand_gen"] is masks.generate


def test_the_site_mod_masks_with_fedscans_generator() -> None:
    """Flower's own masking step, after the install: removing fedscan's mask for the
    private seed leaves the quantised update (values within the quantisation range);
    removing Flower's leaves noise."""
    install_site_masks()
    q, m = 2**22, 2**40
    state = SecAggPlusState(
        nid=1, threshold=1, clipping_range=8.0, target_range=q, mod_range=m, max_weight=100.0
    )
    state.rd_seed = SEED
    update = [np.linspace(-1, 1, 1000), np.array([0.5])]
    configs = ConfigRecord({Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []})
    out = _collect_masked_vectors(state, configs, 50, ndarrays_to_parameters(update))
    from flwr.common import bytes_to_ndarray

    masked = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
    shapes = [a.shape for a in masked]
    ours = [(v - k) % m for v, k in zip(masked, masks.generate(SEED, m, shapes), strict=True)]
    assert max(int(a.max()) for a in ours) <= q
    theirs = [(v - k) % m for v, k in zip(masked, flower_masks(SEED, m, shapes), strict=True)]
    assert max(int(a.max()) for a in theirs) > 2**30


def test_the_checked_flwr_is_the_installed_one() -> None:
    """Prompts a re-check on every flwr upgrade: is flwrlabs/flower issue 7522 fixed
    (PR 7570), so fedscan's mask patch can go? Does the patch still take effect?"""
    installed = importlib.metadata.version("flwr")
    assert installed == masks.FLWR_CHECKED, (
        f"flwr {installed} is installed; fedscan's SecAgg+ mask patch (common/federated/"
        f"masks.py) was checked against {masks.FLWR_CHECKED}. Re-read Flower's "
        "pseudo_rand_gen, secaggplus_mod and SecAggPlusWorkflow, then update FLWR_CHECKED"
    )


def _setup_message(announced: str | None) -> Message:
    configs = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: 3,
        Key.SHARE_NUMBER: 3,
        Key.THRESHOLD: 2,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 2**22,
        Key.MOD_RANGE: 2**40,
        Key.MAX_WEIGHT: 100.0,
    }
    if announced is not None:
        configs[MASK_GENERATOR] = announced
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)})
    meta = Metadata(
        run_id=1,
        message_id="setup",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return make_message(metadata=meta, content=content)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.parametrize("announced", [None, "flower-mt19937"])
def test_a_site_refuses_a_server_on_another_generator(announced) -> None:
    context = _context()
    with pytest.raises(ConfigError) as err:
        pinned_secaggplus_mod(_setup_message(announced), context, lambda m, c: m)
    assert err.value.key == "secure_aggregation.mask_generator"
    assert masks.GENERATOR in str(err.value)
    assert RECORD_KEY_STATE not in context.state.config_records  # no key pair was made


def test_a_site_announces_its_generator_in_the_setup_reply() -> None:
    reply = pinned_secaggplus_mod(_setup_message(masks.GENERATOR), _context(), lambda m, c: m)
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert configs[MASK_GENERATOR] == masks.GENERATOR
    assert Key.PUBLIC_KEY_1 in configs and Key.PUBLIC_KEY_2 in configs
