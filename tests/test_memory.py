"""The memory estimate, validated against the bytes autograd really saves at LLaMA-7B width."""
import pytest
import torch

from memory import BASES, count_parameters, estimate_training_memory, largest_micro_batch, main
from memory import saved_activation_bytes
from model import Llama, ModelArgs, apply_lora


def measured_saved_bytes(model, ids, autocast):
    """Bytes of the distinct non-parameter tensors autograd keeps for backward during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model.hidden_states(ids)
    return sum(saved.values())


@pytest.fixture(scope="module")
def wide_models():
    """1- and 2-layer models at LLaMA-7B width (D 4096, I 11008, 32 heads), bf16, LoRA r=16 on q,k,v,o."""
    models = {}
    for n_layers in (1, 2):
        with torch.device("meta"):
            model = Llama(ModelArgs(n_layers=n_layers, vocab_size=256))
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        for p in model.parameters():
            p.data.uniform_(-0.02, 0.02)
        apply_lora(model)
        models[n_layers] = model.train()
    return models


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_activation_estimate_matches_saved_tensors(wide_models, n_layers, checkpointing, autocast):
    model = wide_models[n_layers]
    model.grad_checkpointing = checkpointing
    B, T = 2, 16
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    measured = measured_saved_bytes(model, ids, autocast)
    # On CPU the dropout mask has the input's dtype (fp32), where CUDA uses a bool mask.
    predicted = saved_activation_bytes(model.args, B * T, checkpointing,
                                       act_bytes=2, autocast=autocast, mask_bytes=4)
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


@pytest.mark.parametrize("args", [ModelArgs(), ModelArgs.tiny(), ModelArgs.tiny(tie_word_embeddings=True),
                                  ModelArgs(dim=8192, n_layers=2, n_heads=64, n_kv_heads=8,
                                            intermediate_size=28672), ModelArgs.tiny(attention_bias=True)])
def test_parameter_counts(args):
    with torch.device("meta"):
        model = Llama(args)
    assert count_parameters(args) == sum(p.numel() for p in model.parameters())
    apply_lora(model)
    lora = estimate_training_memory(args, 1, 8)["lora_params_grads_adamw"]
    assert lora == 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_llama_7b_estimate_and_largest_micro_batch():
    args = ModelArgs()
    parts = estimate_training_memory(args, rows=8, seq_len=256)
    assert parts["weights"] == 6_738_415_616 * 2
    assert parts["lora_params_grads_adamw"] == 16_777_216 * 16
    without = estimate_training_memory(args, rows=8, seq_len=256, grad_checkpointing=False)
    assert without["activations"] > 10 * parts["activations"]  # what checkpointing buys
    rows = largest_micro_batch(args, 256, budget_gib=24.0)
    fits = lambda n: sum(estimate_training_memory(args, n, 256).values()) <= 23 * 2**30
    assert rows > 0 and fits(rows) and not fits(rows + 1)


# Parameter counts the model cards and safetensors indexes publish (total_size / 2 bytes in bf16).
PUBLISHED = {"llama-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_248_023_552,
             "qwen2.5-7b": 7_615_616_512, "tinyllama-1.1b": 1_100_048_384}


@pytest.mark.parametrize("name", PUBLISHED)
def test_bases_have_their_published_sizes(name):
    with torch.device("meta"):
        model = Llama(BASES[name])
    assert count_parameters(BASES[name]) == sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name,lora,largest", [("llama-3-8b", 13_631_488, 18),
                                               ("qwen2.5-7b", 10_092_544, 18)])
def test_llama_3_and_qwen_2_5_at_the_papers_settings(name, lora, largest):
    """Micro-batch 16 (32 rows) of 256 tokens, LoRA r 16 on q, k, v, o: GQA shrinks k and v's LoRA, and a
    vocabulary of 128,256 or 152,064 makes logits over every token the largest activation."""
    args = BASES[name]
    parts = estimate_training_memory(args, rows=32, seq_len=256)
    assert parts["lora_params_grads_adamw"] == lora * 16
    assert parts["logits"] == 32 * 256 * args.vocab_size * (2 + 4 + 4) > parts["activations"]
    assert largest_micro_batch(args, 256) == largest  # rows, every token supervised
    answers = largest_micro_batch(args, 256, supervised_per_row=8)  # CoIN's answers: a few tokens each
    assert answers > 2 * largest
    fits = lambda n: sum(estimate_training_memory(args, n, 256, supervised_per_row=8).values()) <= 23 * 2**30
    assert fits(answers) and not fits(answers + 1)


def test_memory_command_takes_a_base_name(capsys):
    main(["--config", "qwen2.5-7b", "--rows", "32"])
    assert capsys.readouterr().out.startswith("7.62B parameters")
