"""Training, one module per concern:

- :mod:`.step`: one step's loss (generative objective + regularizers, one student forward) and
  the gradient accumulation over micro-batches;
- :mod:`.update`: the optimizer update after the backward pass (clip, finiteness check, loss
  scaling, step, EMA);
- :mod:`.loop`: the schedule of steps, logs, grids, evaluations and checkpoints, and the
  interface it drives (:class:`.loop.LoopHost`);
- :mod:`.trainer`: :func:`.trainer.train` and the :class:`.trainer.Trainer` the loop drives;
- :mod:`.outcome`, :mod:`.metrics`, :mod:`.distributed`, :mod:`.rng`, :mod:`.samples`: how a run
  ends, its metrics log, process groups, random state, sample grids.

The held-out loss and the comparison report of runs are evaluation: :mod:`selfalign.evaluation.heldout`,
:mod:`selfalign.evaluation.report`.

Import from the modules themselves (``from selfalign.training.trainer import train``): this
package imports nothing, so ``selfalign.training.distributed`` does not pull in the trainer.
"""
