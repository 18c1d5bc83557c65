"""GLM-4.5 (``Glm4MoeForCausalLM``) against transformers: the checks of
``test_deepseek_parity.py`` on GLM's tiny cases (partial rotary, q/k/v biases and q/k norms,
sigmoid + noaux_tc routing over two groups, shared experts, a dense first layer)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from test_deepseek_parity import (  # noqa: E402, F401
    make_case,
    test_batched_decode_matches_one_sequence_at_a_time,
    test_kv_bytes_per_token,
    test_kv_cached_decode_matches_full_recompute,
    test_logits_and_greedy_tokens_match_transformers,
    test_quantized_stores_load_and_generate,
    test_store_streams_bit_identically_to_resident,
    test_traces_split_and_prefetch_see_routed_experts_only,
)


@pytest.fixture(scope="module", params=["glm", "glm-plain"])
def family_case(request, tmp_path_factory):
    return make_case(request.param, tmp_path_factory.mktemp(request.param))
