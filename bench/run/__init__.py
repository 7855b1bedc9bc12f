"""The run layer, in four modules, each importing only those above it in this list:

- ``bench.run.plan``: what to run (``GridSpec`` -> ``Plan`` of ``DefenseCell`` / ``DetectCell``,
  ``TrainJob`` and its cache key, the task ``graph``);
- ``bench.run.cells``: what one task does (train or find a model, run a defense or detection cell,
  build its record);
- ``bench.run.rundir``: the run folder (lock, one file per finished cell, merged records, resume);
- ``bench.run.execute``: the three executors (in-process, local processes, Dask) and ``run_grid``,
  the driver's loop over finished tasks.

Import from the module that defines a name (``from bench.run.plan import GridSpec``); this
package file imports nothing, so that no module of the layer depends on it.
"""
