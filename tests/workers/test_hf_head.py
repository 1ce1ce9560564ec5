"""CausalLM's logits are the model's own: what follows the LM head (Gemma-2's final
soft-capping, Cohere's logit_scale, Granite's logits_scaling) is applied, for every row and
for the rows asked for, with and without a tree mask."""
import pytest
import torch

from dovetail.workers.hf import CausalLM

pytestmark = pytest.mark.timeout(120)

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def tiny(kind: str):
    import transformers as tf
    if kind == "gemma2":  # soft-capping squashes logits into (-cap, cap)
        cfg = tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=None,
                              sliding_window=256, query_pre_attn_scalar=8)
        cls = tf.Gemma2ForCausalLM
    elif kind == "cohere":
        cfg, cls = tf.CohereConfig(**COMMON, logit_scale=0.125), tf.CohereForCausalLM
    else:
        cfg, cls = tf.GraniteConfig(**COMMON, logits_scaling=8.0), tf.GraniteForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).to(torch.float64).eval()
    with torch.no_grad():  # large logits: scaling or capping them is then plain to see
        model.get_output_embeddings().weight.mul_(50.0)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_logits_are_the_models_own(kind):
    model = tiny(kind)
    lm = CausalLM(model, "cpu")
    tokens = [3, 9, 27, 17, 51, 2, 40]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].float()
        raw = model.get_output_embeddings()(model.model(torch.tensor([tokens])).last_hidden_state)[0].float()
    assert not torch.allclose(want, raw, atol=1e-3)  # the post-processing matters here
    got = lm.forward(lm.new_cache(), tokens)
    torch.testing.assert_close(got.logits, want, rtol=1e-6, atol=1e-6)
    assert got.hidden.shape == (len(tokens), 32)
    last = lm.forward(lm.new_cache(), tokens, logit_rows=[-1]).logits
    torch.testing.assert_close(last, want[-1:], rtol=1e-6, atol=1e-6)
    # A chain drafted as a tree (row parents = a chain) goes through the explicit-mask path.
    cache = lm.new_cache()
    lm.forward(cache, tokens[:3], logit_rows=[])
    tree = lm.forward(cache, tokens[3:], row_parents=[-1, 0, 1, 2])
    torch.testing.assert_close(tree.logits, want[3:], rtol=1e-6, atol=1e-6)
