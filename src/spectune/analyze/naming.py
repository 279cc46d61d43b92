"""What a weight matrix is, from its parameter name.

Naming conventions differ by family (BERT, Llama/Qwen/Gemma/Mistral, GPT-2,
GGUF/llama.cpp, Meta's original); one ordered table of patterns maps them all to
a small vocabulary of module types so plans can treat "all value projections"
alike whatever the model calls them.

Only matrices get a type: 1-D weights such as Gemma 3's four norms per block and its
q_norm/k_norm are "other" (they still carry their block index), and a tied LM head
(Gemma, SmolLM2) is the embedding matrix, reported once as ``embedding``.
"""

from __future__ import annotations

import re

MODULE_TYPES = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "attn_qkv",
    "ffn_up",
    "ffn_gate",
    "ffn_down",
    "embedding",
    "lm_head",
    "other",
)
# the matrices inside a transformer block (attention and feed-forward): what plans adapt by default
BLOCK_TYPES = tuple(t for t in MODULE_TYPES if t.startswith(("attn_", "ffn_")))

# Order matters: the first pattern that matches wins (e.g. BERT's attention.output.dense
# must be seen before the generic output.dense that is BERT's feed-forward down projection).
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("lm_head", r"(^|\.)(lm_head|embed_out|cls\.predictions\.decoder)(\.|$)|^output\.weight$"),
    (
        "embedding",
        r"(embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|embed_positions"
        r"|tok_embeddings|token_embd|position_embd|(^|\.)wte|(^|\.)wpe|(^|\.)shared)(\.|$)",
    ),
    ("attn_qkv", r"(c_attn|qkv_proj|query_key_value|[Ww]qkv|attn_qkv|(^|\.)qkv)(\.|$)"),
    ("attn_q", r"(q_proj|\.query|q_lin|(^|\.)wq|attn_q|\.q)(\.|$)"),
    ("attn_k", r"(k_proj|\.key|k_lin|(^|\.)wk|attn_k|\.k)(\.|$)"),
    ("attn_v", r"(v_proj|\.value|v_lin|(^|\.)wv|attn_v|\.v)(\.|$)"),
    (
        "attn_o",
        r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|attn_output|out_lin|(^|\.)wo"
        r"|self_attention\.dense|attn\.dense)(\.|$)",
    ),
    ("ffn_gate", r"(gate_proj|gate_up_proj|ffn_gate|feed_forward\.w1|(^|\.)w1|mlp\.gate)(\.|$)"),
    (
        "ffn_up",
        r"(up_proj|intermediate\.dense|mlp\.c_fc|fc1|ffn_up|feed_forward\.w3|(^|\.)w3|lin1|dense_h_to_4h"
        r"|mlp\.fc_in)(\.|$)",
    ),
    (
        "ffn_down",
        r"(down_proj|(^|\.)output\.dense|mlp\.c_proj|fc2|ffn_down|feed_forward\.w2|(^|\.)w2|lin2"
        r"|dense_4h_to_h|mlp\.fc_out)(\.|$)",
    ),
)
_COMPILED = tuple((t, re.compile(p)) for t, p in _PATTERNS)
_BLOCK = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|blk|block|decoder\.layers|encoder\.layer)\.(\d+)(?:\.|$)")


def module_type(name: str) -> str:
    """Module type of a parameter name, one of MODULE_TYPES."""
    for kind, pattern in _COMPILED:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """Transformer block index parsed from the name, or None outside the blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None
