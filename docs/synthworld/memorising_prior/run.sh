set -e
cd /work/main; source .venv/bin/activate; date -u
python -c "from moa.synthworld.world import write_synthetic_ffhq as w; w('/tmp/pm/world_described', num_samples=160, size=64, seed=0, described_fraction=1.0)"
python -m moa.training experiment=synth_prior base_model=moa/assets/synth-prior paths.cache_dir=/tmp/pm/cache \
    embedded.data_root=/tmp/pm/world_described trainer.max_steps=1000 model.optimizer.lr=2e-4 model.snr_gamma=5.0 \
    +callbacks.ema._target_=pytorch_lightning.callbacks.EMAWeightAveraging +callbacks.ema.decay=0.995 \
    +callbacks.ema.update_starting_at_step=250 +callbacks.ema.use_buffers=false \
    callbacks.model_checkpoint.every_n_train_steps=250 \
    hydra.run.dir=/tmp/pm/prior_run export_dir=/tmp/pm/prior logger=csv
date -u
python -m moa.synthworld prior=/tmp/pm/prior out=/tmp/pm/sw scale.world_samples=160 "variants=[]" eval.spread_judge_seed=null
date -u
python -m moa.synthworld prior=/tmp/pm/prior out=/tmp/pm/sw scale.world_samples=160 "variants=[synth_moa]" eval.spread_judge_seed=null
date -u
