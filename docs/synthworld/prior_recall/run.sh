# The prior-recall check, 2026-12-05/06 (2-core CPU). Exact commands; wall times in README.md.
set -e
cd /work/main; source .venv/bin/activate
# The prior recipe of ../memorising_prior/run.sh (min-SNR 5, EMA from step 250, lr 2e-4, from the committed
# prior) on a fully described world: train_prior WORLD_SCENES MAX_STEPS DIR writes DIR/world_described, DIR/prior.
train_prior() {
    python -c "from moa.synthworld.world import write_synthetic_ffhq as w; w('$3/world_described', num_samples=$1, size=64, seed=0, described_fraction=1.0)"
    python -m moa.training experiment=synth_prior base_model=moa/assets/synth-prior paths.cache_dir=$3/cache \
        embedded.data_root=$3/world_described trainer.max_steps=$2 model.optimizer.lr=2e-4 model.snr_gamma=5.0 \
        +callbacks.ema._target_=pytorch_lightning.callbacks.EMAWeightAveraging +callbacks.ema.decay=0.995 \
        +callbacks.ema.update_starting_at_step=250 +callbacks.ema.use_buffers=false \
        callbacks.model_checkpoint.every_n_train_steps=250 \
        hydra.run.dir=$3/prior_run export_dir=$3/prior logger=csv
}
# plain_world SCENES DIR writes DIR/world: the same scenes with plain captions (what stage 2 trains on).
plain_world() {
    python -c "from moa.synthworld.world import write_synthetic_ffhq as w; w('$2/world', num_samples=$1, size=64, seed=0)"
}
# moa_recall DIR RUN EXPERIMENT [OVERRIDES...]: stage 2 on DIR/prior and DIR/world into DIR/RUN (synth_moa...),
# then recall.py on DIR/world_described into DIR/recall_moa....json (the committed names: synth_moa_4k -> recall_moa_4k).
moa_recall() {
    python -m moa.training paths.cache_dir=$1/cache seed=0 logger=csv embedded.data_root=$1/world experiment=$3 \
        hydra.run.dir=$1/$2 base_model=$1/prior image_encoder=moa/assets/synth-clip "${@:4}"
    python docs/synthworld/prior_recall/recall.py $1/prior $1/world_described $1/recall_${2/synth_moa/moa}.json --moa-weights $1/$2/moa_weights
}
# 1. The memorising prior of ../memorising_prior/ (160 scenes, 1000 steps; 16.8 min here)
train_prior 160 1000 /tmp/pm
python docs/synthworld/prior_recall/recall.py /tmp/pm/prior /tmp/pm/world_described /tmp/pr/recall.json  # 55 s
# 2. An overfitting prior: the same recipe, 1500 steps on 32 scenes (28 trained on, each seen ~1700 times; 27.1 min)
train_prior 32 1500 /tmp/po
# 3. MoA (synth_moa, 1000 steps) on the overfitting prior, trained on the same 32 scenes with plain captions
plain_world 32 /tmp/po
moa_recall /tmp/po synth_moa synth_moa  # overfit_prior/recall_moa.json
# 4. A middle point: the same recipe, 3000 steps on 128 scenes (~112 trained on, each seen ~860 times), then MoA
#    on it trained on the same scenes with plain captions, and recall on trained-on and held-out scenes
train_prior 128 3000 /tmp/pmid
plain_world 128 /tmp/pmid
moa_recall /tmp/pmid synth_moa synth_moa  # mid_prior/recall_moa.json
# 5. The same MoA stage, 4x longer (4000 steps: each trained-on person seen ~570 times, as in step 3's 1000 steps on 28)
moa_recall /tmp/pmid synth_moa_4k synth_moa trainer.max_steps=4000  # mid_prior/recall_moa_4k.json
# 6. The same MoA stage with the encoder's last two layers trained too (synth_moa_encoder2, 1000 steps)
moa_recall /tmp/pmid synth_moa_enc2 synth_moa_encoder2  # mid_prior/recall_moa_enc2.json
# 7. More people at the same views each (added 2026-12-06): the same recipe, 12000 steps on 512 scenes (448 trained
#    on, ~860 views each; 92.7 min), MoA on it (1000 steps), recall on 48 trained-on and 48 held-out scenes (8.7 min)
train_prior 512 12000 /tmp/pbig
plain_world 512 /tmp/pbig
moa_recall /tmp/pbig synth_moa synth_moa  # many_people_prior/recall_moa.json
# 8. The main report's protocol (measure.py: 8 held-out subjects x 4 contexts x 2 seeds, committed judges) with that
#    prior on the default 2000-scene world: stage 2 synth_moa and synth_no_moa (16.7 min) -> many_people_prior/measure/
python -m moa.synthworld prior=/tmp/pbig/prior judges=committed 'variants=[synth_moa,synth_no_moa]' out=/tmp/sw_big
# 9. More people, fewer views each, half the compute (added 2026-12-06, third session; a machine at 0.79 s/step):
#    the same recipe, 6000 steps on 1024 scenes (896 trained on, ~214 views each; 80 min), the main protocol, then
#    MoA and recall. As it ran, the prior was `train_prior 1024 12000 /tmp/p1k` stopped after its step-5750
#    checkpoint and resumed to 6000 by the same training command with trainer.max_steps=6000
#    ckpt_path=/tmp/p1k/prior_run/checkpoints/step_0005750.ckpt (constant lr, step-seeded noise; only the order of
#    the last 250 batches may differ from one 6000-step run). recall.py without MoA also ran: recall_moa.json has it.
train_prior 1024 6000 /tmp/p1k
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa,synth_no_moa]' out=/tmp/sw_1k  # many_people_6k/measure/
plain_world 1024 /tmp/p1k
moa_recall /tmp/p1k synth_moa synth_moa  # many_people_6k/recall_moa.json
# 10. The subject-token lever (added 2026-12-06, fourth session): the step-9 prior again (`train_prior 1024 6000 /tmp/p1k`,
#     one uninterrupted run, 90.5 min on a machine at ~0.9 s/step), then the main protocol with synth_moa and
#     synth_moa_tokens4 (model.net.tokens_per_subject=4) side by side on it -> many_people_6k/tokens4/
train_prior 1024 6000 /tmp/p1k
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa,synth_moa_tokens4]' out=/tmp/sw_tok
# 11. The router levers on this prior (added 2026-12-06, fifth session): step 10's prior (its training command rerun
#     resumes at step 6000 and re-exports it; 32.9 min for both variants) -> many_people_6k/router/
train_prior 1024 6000 /tmp/p1k
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_router_fg,synth_moa_router_x100]' out=/tmp/sw_fg
# 12. synth_moa at 4000 stage-2 steps on this prior (added 2026-12-06, fifth session): step 10's synth_moa run
#     (/tmp/sw_tok) continued from its last checkpoint (step 900) to 4000 (35.7 min) -> many_people_6k/stage2_4000/
mkdir -p /tmp/sw_4k && cp -r /tmp/sw_tok/{world,cache,judges_seed1,synth_moa} /tmp/sw_4k/ && rm -rf /tmp/sw_4k/synth_moa/moa_weights
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa]' out=/tmp/sw_4k \
  'scale.stage_overrides=["trainer.max_steps=4000","trainer.val_check_interval=500","callbacks.samples.every_n_steps=500"]'
#     and on to 6000 from the 4000-step run's last checkpoint (step 3900; 24.0 min) -> stage2_4000/*_6000.*
mkdir -p /tmp/sw_6k && cp -r /tmp/sw_4k/{world,cache,judges_seed1,synth_moa} /tmp/sw_6k/ && rm -rf /tmp/sw_6k/synth_moa/moa_weights
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa]' out=/tmp/sw_6k \
  'scale.stage_overrides=["trainer.max_steps=6000","trainer.val_check_interval=500","callbacks.samples.every_n_steps=500"]'
# 13. The hair-colour confusion of the 4000-step MoA (added 2026-12-06, fifth session; 3.5 min) -> stage2_4000/hair_confusion.json
python docs/synthworld/prior_recall/hair_confusion.py /tmp/p1k/prior /tmp/sw_4k/world /tmp/sw_4k/synth_moa/moa_weights \
    docs/synthworld/prior_recall/many_people_6k/stage2_4000/hair_confusion.json 16
# 14. The face-weighted loss (added 2026-12-07): first where the 4000-step MoA loses hair colour (0.5 min
#     uncontended) -> many_people_6k/face_loss/token_probe_synth_moa_4000.json
python docs/synthworld/prior_recall/many_people_6k/face_loss/token_probe.py /tmp/p1k/prior /tmp/sw_4k/world \
    /tmp/sw_4k/synth_moa/moa_weights docs/synthworld/prior_recall/many_people_6k/face_loss/token_probe_synth_moa_4000.json
#     then synth_moa_face (model.face_loss_weight=3, data.face_regions=true), 4000 steps from scratch on the same
#     prior; the world is rendered anew (face boxes added, images and other fields byte-identical to step 12's), the
#     second judge and the prior-image cache were copied from step 12 to save their time -> many_people_6k/face_loss/
mkdir -p /tmp/sw_face && cp -r /tmp/sw_4k/{cache,judges_seed1} /tmp/sw_face/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_face]' out=/tmp/sw_face \
  'scale.stage_overrides=["trainer.max_steps=4000","trainer.val_check_interval=500","callbacks.samples.every_n_steps=500"]'
# 15. synth_moa_tokens4 at 4000 stage-2 steps (added 2026-12-07): step 10's tokens4 run continued from its last
#     checkpoint (step 900) to 4000 (34.7 min) -> many_people_6k/tokens4/*_4000.*
mkdir -p /tmp/sw_tok4k && cp -r /tmp/sw_tok/{world,cache,judges_seed1,synth_moa_tokens4} /tmp/sw_tok4k/ && rm -rf /tmp/sw_tok4k/synth_moa_tokens4/moa_weights
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_tokens4]' out=/tmp/sw_tok4k \
  'scale.stage_overrides=["trainer.max_steps=4000","trainer.val_check_interval=500","callbacks.samples.every_n_steps=500"]'
python docs/synthworld/prior_recall/hair_confusion.py /tmp/p1k/prior /tmp/sw_tok4k/world \
    /tmp/sw_tok4k/synth_moa_tokens4/moa_weights docs/synthworld/prior_recall/many_people_6k/tokens4/hair_confusion_4000.json 16
# 16. The patch-token lever (added 2026-12-07, second session; model.net.patch_tokens): step 10's prior rebuilt
#     (/tmp had been wiped; `train_prior 1024 6000 /tmp/p1k`), then synth_moa_patches at 4000 stage-2 steps from
#     scratch, then the hair-colour confusion -> many_people_6k/patch_tokens/
train_prior 1024 6000 /tmp/p1k
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_patches]' out=/tmp/sw_patch \
  'scale.stage_overrides=["trainer.max_steps=4000","trainer.val_check_interval=500","callbacks.samples.every_n_steps=500"]'
python docs/synthworld/prior_recall/hair_confusion.py /tmp/p1k/prior /tmp/sw_patch/world \
    /tmp/sw_patch/synth_moa_patches/moa_weights docs/synthworld/prior_recall/many_people_6k/patch_tokens/hair_confusion.json 16
#     and whether the reference's studio background changes what MoA draws (background_leak.py, 1.8 min each), on
#     those weights and on a 1000-step synth_moa of the same world -> many_people_6k/patch_tokens/background_leak_*.json
python -m moa.training paths.cache_dir=/tmp/sw_patch/cache seed=0 logger=csv embedded.data_root=/tmp/sw_patch/world \
  experiment=synth_moa hydra.run.dir=/tmp/sw_patch/synth_moa base_model=/tmp/p1k/prior image_encoder=moa/assets/synth-clip
python docs/synthworld/prior_recall/background_leak.py /tmp/p1k/prior /tmp/sw_patch/world /tmp/sw_patch/synth_moa/moa_weights \
  docs/synthworld/prior_recall/many_people_6k/patch_tokens/background_leak_synth_moa_1000.json 8
python docs/synthworld/prior_recall/background_leak.py /tmp/p1k/prior /tmp/sw_patch/world /tmp/sw_patch/synth_moa_patches/moa_weights \
  docs/synthworld/prior_recall/many_people_6k/patch_tokens/background_leak_synth_moa_patches.json 8
# 17. Where held-out identity was lost (added 2026-12-07, third session) -> many_people_6k/where_identity_is_lost/
#     (a) synth_moa_tokens4 at batch 32, 4000 steps from scratch, and its hair-colour confusion
mkdir -p /tmp/sw_b32 && cp -r /tmp/sw_patch/{world,cache,judges_seed1} /tmp/sw_b32/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_tokens4]' out=/tmp/sw_b32 \
  'scale.stage_overrides=["trainer.max_steps=4000","data.batch_size=32","trainer.val_check_interval=500","callbacks.samples.every_n_steps=500"]'
python docs/synthworld/prior_recall/hair_confusion.py /tmp/p1k/prior /tmp/sw_b32/world \
    /tmp/sw_b32/synth_moa_tokens4/moa_weights /tmp/sw_b32/hair_confusion.json 16
#     (b) which reference attributes the trained denoiser uses, on head and body (judge-free, counterfactual)
python docs/synthworld/prior_recall/attribute_use.py /tmp/p1k/prior /tmp/sw_patch/world /tmp/attribute_use \
  synth_moa_1000=/tmp/sw_patch/synth_moa/moa_weights \
  synth_moa_tokens4_batch32_4000=/tmp/sw_b32/synth_moa_tokens4/moa_weights
#     (c) after commit 615582d (the pipeline encodes the training crop): the same weights evaluated again, with the
#     claims' synth_no_moa baseline trained (1000 steps), then the hair confusion and subject guidance 10
mkdir -p /tmp/sw_fix && cp -r /tmp/sw_patch/{world,cache,judges_seed1,synth_moa,synth_moa_patches} /tmp/sw_fix/ \
  && cp -r /tmp/sw_b32/synth_moa_tokens4 /tmp/sw_fix/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed \
  'variants=[synth_moa,synth_no_moa,synth_moa_tokens4,synth_moa_patches]' out=/tmp/sw_fix
python docs/synthworld/prior_recall/hair_confusion.py /tmp/p1k/prior /tmp/sw_fix/world \
    /tmp/sw_fix/synth_moa_tokens4/moa_weights /tmp/sw_fix/hair_confusion_tokens4.json 16
mkdir -p /tmp/sw_fix_sg && cp -r /tmp/sw_fix/{world,cache,judges_seed1,synth_moa_tokens4} /tmp/sw_fix_sg/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_tokens4]' out=/tmp/sw_fix_sg \
  eval.subject_guidance_scale=10
# 18. Every claim on this prior with the training crop, at 1x and 8x the evaluation, and four tokens at one token's
#     recipe (added 2026-12-07, fifth session) -> many_people_6k/claims_8x/ (its README has the wall times)
train_prior 1024 6000 /tmp/p1k
#     (as it ran, /tmp/sw_all first got world/ and judges_seed1/ of a prior=committed run: the same world, saves ~2 min)
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed out=/tmp/sw_all
mkdir -p /tmp/sw_tok1k && cp -r /tmp/sw_all/{world,cache,judges_seed1} /tmp/sw_tok1k/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_tokens4]' out=/tmp/sw_tok1k
mkdir -p /tmp/sw_all_8x && cp -r /tmp/sw_all/{world,cache} /tmp/sw_all_8x/
for v in synth_moa synth_no_moa synth_no_spacetime; do mkdir -p /tmp/sw_all_8x/$v && cp -r /tmp/sw_all/$v/{moa_weights,csv} /tmp/sw_all_8x/$v/; done
mkdir -p /tmp/sw_all_8x/synth_moa_tokens4 && cp -r /tmp/sw_tok1k/synth_moa_tokens4/{moa_weights,csv} /tmp/sw_all_8x/synth_moa_tokens4/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa,synth_no_moa,synth_no_spacetime,synth_moa_tokens4]' \
  out=/tmp/sw_all_8x eval.contexts=16 eval.seeds=4 eval.spread_judge_seed=null
# 19. One token (synth_moa) at the four-token run's recipe, 4000 steps at batch 32 (added 2026-12-07, fifth session),
#     with step 18's 1000-step synth_no_moa copied in as the claims' baseline -> many_people_6k/claims_8x/*_b32_4000.*
mkdir -p /tmp/sw_b32_1tok && cp -r /tmp/sw_all/{world,cache,judges_seed1} /tmp/sw_b32_1tok/
mkdir -p /tmp/sw_b32_1tok/synth_no_moa && cp -r /tmp/sw_all/synth_no_moa/{moa_weights,csv} /tmp/sw_b32_1tok/synth_no_moa/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa,synth_no_moa]' out=/tmp/sw_b32_1tok \
  'scale.stage_overrides=["trainer.max_steps=4000","data.batch_size=32","trainer.val_check_interval=500","callbacks.samples.every_n_steps=500"]'
# routing_oracle TAG [ARGS...]: routing_oracle.py at 8x the evaluation on step 18's world, prior and no_moa, into
# many_people_6k/routing_oracle/routing_oracle{TAG}.* (ARGS: --modes ..., --weights NAME=DIR ...).
routing_oracle() {
    python docs/synthworld/prior_recall/routing_oracle.py --prior /tmp/p1k/prior --world /tmp/sw_all/world \
        --out docs/synthworld/prior_recall/many_people_6k/routing_oracle --contexts 16 --seeds 4 \
        --no-moa /tmp/sw_all/synth_no_moa/moa_weights --tag "$1" "${@:2}"
}
# all_layers_loss DIR LAMBDA_ROUTER: synth_moa with the layer set L of both losses widened to all 16 blocks (the paper
# skips the first 2 and last 3), 1000 steps, router loss weight LAMBDA_ROUTER, step 18's world, cache, second judge
# and synth_no_moa copied in as the baseline; evaluated at 1x into DIR/results.*
all_layers_loss() {
    mkdir -p $1/synth_no_moa && cp -r /tmp/sw_all/{world,cache,judges_seed1} $1/ \
        && cp -r /tmp/sw_all/synth_no_moa/{moa_weights,csv} $1/synth_no_moa/
    python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa,synth_no_moa]' out=$1 \
        "scale.stage_overrides=[\"model.net.moa_config.loss_skip_first_blocks=0\",\"model.net.moa_config.loss_skip_last_blocks=0\",\"model.lambda_router=$2\"]"
}
# 20. Would separating routers bring disentanglement? (added 2026-12-07, sixth session) step 18's and 19's trained
#     weights, their routing replaced at inference by oracle ones, at 8x the evaluation -> many_people_6k/routing_oracle/
#     (38 min; run before the per-layer router table was added to the script, so its JSON lacks router_per_layer)
routing_oracle "" --modes learned sharpened background_to_prior oracle_split \
  --weights synth_moa_1000=/tmp/sw_all/synth_moa/moa_weights synth_moa_b32_4000=/tmp/sw_b32_1tok/synth_moa/moa_weights
# 21. The router loss on every layer, the paper's weight (12.0 min: 8.0 stage 2, 3.9 evaluation; as it ran, without
#     the lambda_router override, which equals the default 1e-4) -> many_people_6k/routing_oracle/results_all_layers_loss.*
all_layers_loss /tmp/sw_allL 1.0e-4
# 22. Which layers' routers leak (per-layer prior weight, the oracle in or outside L), and step 21's weights at 8x
routing_oracle _layers --modes learned background_to_prior_in_loss_layers background_to_prior_outside_loss_layers \
  --weights synth_moa_1000=/tmp/sw_all/synth_moa/moa_weights
routing_oracle _all_layers_loss --modes learned background_to_prior \
  --weights synth_moa_all_layers_loss=/tmp/sw_allL/synth_moa/moa_weights
# 23. Step 21 with the router loss 10x the paper's, then at 8x (12.0 min + 8.1 min)
all_layers_loss /tmp/sw_allL10 1.0e-3
routing_oracle _all_layers_loss_x10 --modes learned --weights synth_moa_all_layers_loss_x10=/tmp/sw_allL10/synth_moa/moa_weights
# 24. Step 21 with the router loss 100x the paper's, then at 8x (12.0 min + 7.8 min)
all_layers_loss /tmp/sw_allL100 1.0e-2
routing_oracle _all_layers_loss_x100 --modes learned --weights synth_moa_all_layers_loss_x100=/tmp/sw_allL100/synth_moa/moa_weights
# 25. Penalise the personalized expert's influence on the background instead of its router weight (added 2026-12-07,
#     seventh session; model.lambda_background_influence, 1e-2 in synth_moa_influence) -> many_people_6k/background_influence/.
#     /tmp had been wiped: step 18's prior rebuilt by the same command, then synth_moa_influence beside synth_no_moa
#     at 1x, then at 8x against that no_moa
train_prior 1024 6000 /tmp/p1k
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_influence,synth_no_moa]' out=/tmp/sw_inf
python docs/synthworld/prior_recall/routing_oracle.py --prior /tmp/p1k/prior --world /tmp/sw_inf/world \
    --out docs/synthworld/prior_recall/many_people_6k/background_influence --contexts 16 --seeds 4 \
    --no-moa /tmp/sw_inf/synth_no_moa/moa_weights --tag "" --modes learned \
    --weights synth_moa_influence=/tmp/sw_inf/synth_moa_influence/moa_weights
# 26. A third of the weight (added 2026-12-08, eighth session; lambda_background_influence 3e-3) -> many_people_6k/
#     background_influence/lambda_3e-3/. /tmp had been wiped: step 18's prior rebuilt by the same command; the lever
#     alone at 1x, synth_no_moa by the runner's own stage command, 8x against it, then the 1x claims table of both
#     (evaluation only). Spread judge off to save its 3.7 min.
train_prior 1024 6000 /tmp/p1k
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_influence]' out=/tmp/sw_3e-3 \
    'scale.stage_overrides=["model.lambda_background_influence=0.003"]' eval.spread_judge_seed=null
python -m moa.training paths.cache_dir=/tmp/sw_3e-3/cache seed=0 logger=csv embedded.data_root=/tmp/sw_3e-3/world \
    experiment=synth_no_moa hydra.run.dir=/tmp/sw_3e-3/synth_no_moa base_model=/tmp/p1k/prior \
    image_encoder=$PWD/moa/assets/synth-clip
python docs/synthworld/prior_recall/routing_oracle.py --prior /tmp/p1k/prior --world /tmp/sw_3e-3/world \
    --out /tmp/sw_3e-3/oracle8x --contexts 16 --seeds 4 \
    --no-moa /tmp/sw_3e-3/synth_no_moa/moa_weights --tag "_lambda_3e-3" --modes learned \
    --weights synth_moa_influence_3e-3=/tmp/sw_3e-3/synth_moa_influence/moa_weights
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_influence,synth_no_moa]' \
    out=/tmp/sw_3e-3 eval.spread_judge_seed=null
for f in /tmp/sw_3e-3/oracle8x/*; do cp $f docs/synthworld/prior_recall/many_people_6k/background_influence/lambda_3e-3/$(basename ${f/_lambda_3e-3/}); done
cp /tmp/sw_3e-3/{results.md,results.json,timings.json,fig7_synth_moa_influence.png,router_maps_synth_moa_influence.png,router_separation.png} \
    docs/synthworld/prior_recall/many_people_6k/background_influence/lambda_3e-3/
# 27. The spacetime ablation with the background-influence term (added 2026-12-08, ninth session) ->
#     many_people_6k/background_influence/spacetime/. Step 26's prior, world and synth_no_moa (copied; the world and
#     the stage are deterministic); synth_moa_influence (1e-2) and synth_no_spacetime with the same term at 1x, both
#     at 8x, then the 1x evaluation again with the per-image readings of commit 0aad1a0 (evaluation only)
mkdir -p /tmp/sw_st && cp -r /tmp/sw_3e-3/{world,cache,synth_no_moa} /tmp/sw_st/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed \
    'variants=[synth_moa_influence,synth_no_spacetime,synth_no_moa]' out=/tmp/sw_st \
    'scale.stage_overrides=["model.lambda_background_influence=0.01"]' eval.spread_judge_seed=null
python docs/synthworld/prior_recall/routing_oracle.py --prior /tmp/p1k/prior --world /tmp/sw_st/world \
    --out /tmp/sw_st/oracle8x --contexts 16 --seeds 4 \
    --no-moa /tmp/sw_st/synth_no_moa/moa_weights --tag "_spacetime_influence" --modes learned \
    --weights synth_moa_influence=/tmp/sw_st/synth_moa_influence/moa_weights \
    --weights synth_no_spacetime_influence=/tmp/sw_st/synth_no_spacetime/moa_weights
# 28. The subject-routing term with the influence term (added 2026-12-08, ninth session): synth_moa_router_fg
#     (router loss 100x, foreground term) + lambda_background_influence 1e-2 -> many_people_6k/background_influence/
#     router_fg/. Same copies as step 27.
mkdir -p /tmp/sw_fgi && cp -r /tmp/sw_3e-3/{world,cache,synth_no_moa} /tmp/sw_fgi/
python -m moa.synthworld prior=/tmp/p1k/prior judges=committed 'variants=[synth_moa_router_fg,synth_no_moa]' \
    out=/tmp/sw_fgi 'scale.stage_overrides=["model.lambda_background_influence=0.01"]' eval.spread_judge_seed=null
python docs/synthworld/prior_recall/routing_oracle.py --prior /tmp/p1k/prior --world /tmp/sw_fgi/world \
    --out /tmp/sw_fgi/oracle8x --contexts 16 --seeds 4 \
    --no-moa /tmp/sw_fgi/synth_no_moa/moa_weights --tag "_router_fg_influence" --modes learned \
    --weights synth_moa_router_fg_influence=/tmp/sw_fgi/synth_moa_router_fg/moa_weights
# 29. synth_moa (the paper's losses) at 8x with the clustered errors of commit 0aad1a0 (added 2026-12-08, ninth
#     session) -> many_people_6k/claims_8x/clustered_errors/. Step 26's prior, world and synth_no_moa copied in.
mkdir -p /tmp/sw_moa && cp -r /tmp/sw_3e-3/{world,cache,synth_no_moa} /tmp/sw_moa/
python -m moa.training paths.cache_dir=/tmp/sw_moa/cache seed=0 logger=csv embedded.data_root=/tmp/sw_moa/world \
    experiment=synth_moa hydra.run.dir=/tmp/sw_moa/synth_moa base_model=/tmp/p1k/prior \
    image_encoder=$PWD/moa/assets/synth-clip
python docs/synthworld/prior_recall/routing_oracle.py --prior /tmp/p1k/prior --world /tmp/sw_moa/world \
    --out /tmp/sw_moa/oracle8x --contexts 16 --seeds 4 \
    --no-moa /tmp/sw_moa/synth_no_moa/moa_weights --tag "_paper_losses" --modes learned \
    --weights synth_moa=/tmp/sw_moa/synth_moa/moa_weights
# 30. More held-out subjects, fewer prompts (added 2026-12-08, ninth session) -> many_people_6k/claims_8x/
#     clustered_errors/routing_oracle_subjects16.*: steps 27 and 29's weights
python docs/synthworld/prior_recall/routing_oracle.py --prior /tmp/p1k/prior --world /tmp/sw_st/world \
    --out /tmp/sw_subj --contexts 4 --seeds 2 --subjects-per-word 16 \
    --no-moa /tmp/sw_st/synth_no_moa/moa_weights --tag "_subjects16" --modes learned \
    --weights synth_moa_influence=/tmp/sw_st/synth_moa_influence/moa_weights synth_moa=/tmp/sw_moa/synth_moa/moa_weights
