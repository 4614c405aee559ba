"""The bench's FLOP floors: counted on meta tensors at SD1.5's real shape, so they hold on any machine."""

import pytest
import torch

from moa.bench import count_flops, sample_runs, train_flops


def test_training_flops_put_moa_between_the_attention_only_and_the_full_finetune():
    flops = train_flops()
    print({k: round(v, 1) for k, v in flops.items()})
    # The plain U-Net's forward + backward at 64x64 latents, batch 1: a full finetune also computes the
    # weight gradients of every layer, the attention-only one those of the attention projections only.
    assert flops["full"] == pytest.approx(2406.8, rel=1e-3)
    assert flops["attention_only"] == pytest.approx(1790.7, rel=1e-3)
    # MoA adds a second expert per layer, the router and the image encoder (ViT-L/14) on its 1 subject.
    # Fusing the experts' kernels must add next to nothing: fused projections that computed the frozen
    # prior's weight gradients, or a stacked first self-attention layer, cost 2496 and 2491 here.
    assert flops["moa"] == pytest.approx(2447.3, rel=1e-3)
    # The map losses' recomputed softmax over the 77 keys costs little beside the step.
    assert flops["moa_without_map_losses"] <= flops["moa"] <= 1.005 * flops["moa_without_map_losses"]


def test_sampling_flops_with_one_subject_are_about_a_quarter_above_the_plain_unet():
    with torch.no_grad():
        flops = {name: count_flops(run) for name, run in sample_runs("meta", torch.float32, 64).items()}
    print({k: round(v, 1) for k, v in flops.items()})
    assert flops["moa_prior_only"] == pytest.approx(flops["plain"], rel=1e-6)
    assert flops["moa_1_subject"] / flops["plain"] == pytest.approx(1.26, abs=0.01)
    assert flops["moa_2_subject"] >= flops["moa_1_subject"]


@pytest.mark.slow
def test_compiled_bench_variants_compute_what_the_eager_ones_do():
    """The GPU bench's compiled variants (``--only train_compiled sample_compiled``), traced here with
    the ``aot_eager`` backend (dynamo + AOTAutograd, no code generation) at a small latent."""
    from moa.bench import COMPILED, first_call_seconds, train_steps

    steps = train_steps(("moa", "full"), batch=1, latent=8, device="cpu", dtype=torch.float32,
                        compile_backend="aot_eager")
    assert set(steps) == {"moa", "full", "moa" + COMPILED, "full" + COMPILED}
    for variant in ("moa", "full"):
        losses = []
        for name in (variant, variant + COMPILED):
            steps[name].prepare()
            losses.append(steps[name].loss())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    moa_steps = {name: steps[name] for name in ("moa", "moa" + COMPILED)}
    _, errors = first_call_seconds(moa_steps, "cpu")  # a whole step each: forward, backward, optimizer
    assert errors == {} and len(moa_steps) == 2
    del steps, moa_steps

    with torch.no_grad():
        runs = sample_runs("cpu", torch.float32, 8, compile_backend="aot_eager")
        for name in ("plain", "moa_prior_only", "moa_1_subject", "moa_2_subject"):
            torch.testing.assert_close(runs[name + COMPILED]().sample, runs[name]().sample, rtol=1e-4, atol=1e-5)

    def broken():
        raise RuntimeError("does not compile")

    runs = {"ok": lambda: None, "broken" + COMPILED: broken}
    seconds, errors = first_call_seconds(runs, "cpu")
    assert set(runs) == {"ok"} and set(seconds) == {"ok"}
    assert errors == {"broken" + COMPILED: "RuntimeError: does not compile"}
