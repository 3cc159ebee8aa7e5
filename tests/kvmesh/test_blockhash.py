from hypothesis import given
from hypothesis import strategies as st

from kvmesh.blockhash import KEY_BYTES, block_keys, root_key

ROOT = root_key("model-a", 16)
tokens = st.lists(st.integers(0, 2**31 - 1), max_size=100)


@given(tokens)
def test_only_full_blocks_have_keys(ids: list[int]) -> None:
    keys = block_keys(ROOT, ids, 16)
    assert len(keys) == len(ids) // 16
    assert all(len(k) == KEY_BYTES for k in keys)


@given(tokens, tokens)
def test_a_key_names_its_whole_prefix(a: list[int], b: list[int]) -> None:
    """Keys agree exactly as far as the full blocks of the two prompts agree."""
    ka, kb = block_keys(ROOT, a, 16), block_keys(ROOT, b, 16)
    for i in range(min(len(ka), len(kb))):
        assert (ka[i] == kb[i]) == (a[: (i + 1) * 16] == b[: (i + 1) * 16])


def test_salt_model_and_block_size_separate_chains() -> None:
    ids = list(range(64))
    base = block_keys(ROOT, ids, 16)
    assert not set(base) & set(block_keys(root_key("model-a", 16, b"tenant-2"), ids, 16))
    assert not set(base) & set(block_keys(root_key("model-b", 16), ids, 16))
    assert not set(base) & set(block_keys(root_key("model-a", 32), ids, 16))


def test_keys_are_stable_across_processes_and_versions() -> None:
    """Stores persist keys: the chain must not depend on the process (no Python hash()). A change
    here orphans every store on disk, so it is a format change, not a refactor."""
    root = root_key("", 16)
    assert root.hex() == "78ab4cb7e6b6f110356324722f923bc0"
    assert block_keys(root, list(range(16)), 16)[0].hex() == "14f7afe757e641bb9cad3ef2e5e6a796"
