"""The speed harness behind bench/speed.py (issue 7): promptcil's stages against what the hardware allows.

Every number is a ratio to a baseline measured in the same process on the same inputs:
  plain         the frozen backbone's forward (method `none`): the inference baseline;
  limit         forward + backward to one vector added to the tokens entering block 0: the
                least work any prompt method's training step can do, since the backbone
                takes no weight gradients: the training baseline.
Each registered prompt method (every name in promptcil.prompts.METHODS except `none`) runs the
trainer's own step (promptcil.training.train_step: autocast, masked cross-entropy, backward,
Adam) and the evaluation's inference (IncrementalModel.predict under autocast), both from uint8
images already on the device. The `features` stage runs promptcil.features.class_statistics
end to end from uint8 images in host memory through the real loader. Time per incremental task
runs IncrementalTrainer.run on equal tasks. Random weights and random images: speed does not
depend on the values, but never time on zeros.

Modules, one job each:
  inputs          Run (the command line's settings, backbones), device-resident random Batches, random image sets
  models          what is measured: the limit's InputPrompt, method configs, method + head on a shared backbone
  timing          measure (first call, warm-up, event-timed groups, peak memory), wall, release
  steps           the timed steps: the trainer's training step, inference, GFLOPs, torch.compile's graph count
  sections        one model's section: baselines, every method, torch.compile; failures recorded, not fatal
  features_stage  the features stage end to end, the loader alone, and where its time goes
  time_per_task   wall time per task of IncrementalTrainer.run against the number of tasks
  targets         the target ratios and their PASS/MISS
  report          the markdown tables and the JSON result file
  provenance      meta: device, versions, commit, code digest
  suite           the whole run: sections in order, the result saved after each

bench/ is a folder of scripts, not an installed package: a script there (`python bench/speed.py`)
has bench/ first on sys.path, so `import harness` finds this package.
"""
