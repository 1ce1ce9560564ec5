"""Model families beyond Qwen2 through the whole pipeline, on tiny random float64 configs:
Llama, Phi-3, and sliding-window attention shorter than the output (Mistral, Qwen2 with
use_sliding_window, Gemma-2's alternating window and global layers, with its soft-capped
logits). The target drafts for itself, so a draft that silently fell back would show as
τ = 1 even though the output stayed right."""
import pytest
import torch

from tests.helpers import plain_greedy

pytestmark = pytest.mark.timeout(300)

WINDOW = 8
PROMPT = [3, 17, 5, 9, 33, 2, 41, 12, 7, 25, 60, 11]  # longer than the window already
NEW = 40
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(kind: str):
    import transformers as tf
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**SIZES), tf.LlamaForCausalLM
    elif kind == "phi3":
        cfg, cls = tf.Phi3Config(**SIZES), tf.Phi3ForCausalLM
    elif kind == "mistral":
        cfg, cls = tf.MistralConfig(**SIZES, sliding_window=WINDOW), tf.MistralForCausalLM
    elif kind == "qwen2-sliding":
        cfg = tf.Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)
        cls = tf.Qwen2ForCausalLM
    else:
        cfg = tf.Gemma2Config(**SIZES, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                              final_logit_softcapping=3.0, attn_logit_softcapping=20.0)
        cls = tf.Gemma2ForCausalLM
    torch.manual_seed(5)
    model = cls(cfg).to(torch.float64).eval()
    with torch.no_grad():  # sharper attention: every token depends on what the window holds
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "qkv_proj"):  # Phi-3 packs all three in one
                if hasattr(layer.self_attn, name):
                    getattr(layer.self_attn, name).weight.mul_(6.0)
    return model


@pytest.fixture(scope="module", params=["llama", "phi3", "mistral", "qwen2-sliding", "gemma2"])
def family(request, launch_tracked, tmp_path_factory):
    model = build(request.param)
    path = tmp_path_factory.mktemp(request.param) / request.param
    model.save_pretrained(path)
    coord = launch_tracked(path, path, overlap=False, auto_tree=False, depth=4, top_k=2, max_nodes=8,
                           stop_token_ids=[])  # the whole output, past any eos, against the reference
    try:
        yield request.param, model, coord
    finally:
        coord.close()


def test_greedy_is_the_models_own_with_the_draft_in_use(family):
    kind, model, coord = family
    want = plain_greedy(model, PROMPT, NEW)  # the model's own full forward, its own masks
    out = coord.generate(PROMPT, max_new_tokens=NEW)
    assert out.token_ids == want, kind
    assert not out.stats.draft_fallback, out.stats.draft_fallback_reason
    assert out.stats.mean_accepted > 1.5, out.stats.summary()
    draft, coord.draft = coord.draft, None  # the same target worker decoding alone
    try:
        assert coord.generate(PROMPT, max_new_tokens=NEW).token_ids == want
    finally:
        coord.draft = draft


def test_sampling_follows_the_soft_capped_distribution(launch_tracked, tmp_path):
    """Gemma-2 with a large LM head: its soft-capped distribution is far flatter than the raw
    logits'. Tokens sampled through the pipeline (the first token of each request: a draft
    token accepted or resampled by the target) must follow the capped one."""
    model = build("gemma2")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    model.save_pretrained(tmp_path / "gemma2-big-head")
    with torch.no_grad():
        capped = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1].float(), -1)
        raw = model.get_output_embeddings()(model.model(torch.tensor([PROMPT])).last_hidden_state)[0, -1]
        uncapped = torch.softmax(raw.float(), -1)
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())  # noqa: E731
    assert tv(capped, uncapped) > 0.4  # the two hypotheses are far apart
    coord = launch_tracked(tmp_path / "gemma2-big-head", tmp_path / "gemma2-big-head", overlap=False,
                           auto_tree=False, depth=2, top_k=2, max_nodes=4, stop_token_ids=[])
    try:
        n = 400
        firsts = [coord.generate(PROMPT, max_new_tokens=2, temperature=1.0, seed=s).token_ids[0] for s in range(n)]
    finally:
        coord.close()
    seen = torch.bincount(torch.tensor(firsts), minlength=capped.numel()).float() / n
    assert tv(seen, capped) < 0.15, (tv(seen, capped), tv(seen, uncapped))
