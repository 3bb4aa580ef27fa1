"""The official CoIN objective (luka-group/CoIN, ContrastiveLlama in run_contrastive_llama.py), re-expressed
on transformers + peft as the official run computes it: the reference that tests/test_coin.py compares our
objective against, and the "official style" peer of benchmarks/bench_batching.py."""
import torch
import torch.nn.functional as F


def official_group_loss(peft_model, group, pad_id, step_groups, temperature=0.05, lam=1000.0):
    """ContrastiveLlama.forward on a micro-batch of one group (2 examples), divided by the step's number of
    micro-batches as HF's Trainer does before its backward: each view left-padded and run in its own forward
    with full logits, pooled at the last position."""
    views, device = [], peft_model.device
    for view in ("original", "paraphrase"):
        rows = [item[view] for item in group]
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.tensor([[pad_id] * (width - len(i)) + i.tolist() for i, _, _ in rows], device=device)
        labels = torch.tensor([[-100] * (width - len(i)) + lab.tolist() for i, lab, _ in rows], device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _, _ in rows], device=device)
        hidden = peft_model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = peft_model.base_model.model.lm_head(hidden).float()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())  # CrossEntropyLoss()
        views.append((ce, hidden[:, -1].float()))  # pooling_method "last"
    (ce_o, h_o), (ce_p, h_p) = views
    sim = F.cosine_similarity(h_o.unsqueeze(1), h_p.unsqueeze(0), dim=2) / temperature
    target = torch.arange(len(group), device=device)
    ctr = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
    gen = ce_o + ce_p
    ctr = ctr * lam  # contrastive_loss * contrastive_loss_ratio, then scale_contrastive_loss
    if ctr != 0 and ctr > gen:
        ctr = ctr * min(lam, gen.detach() / ctr.detach())
    return (ctr + gen) / step_groups


def official_step(peft_model, items, pad_id, temperature=0.05, lam=1000.0):
    """The loss of one optimizer step over `items`, taken two at a time (one group per micro-batch)."""
    groups = [items[i:i + 2] for i in range(0, len(items), 2)]
    return sum(official_group_loss(peft_model, group, pad_id, len(groups), temperature, lam)
               for group in groups)
