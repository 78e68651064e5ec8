"""Training: the per-step loss (:mod:`.step`), the trainer and its loop (:mod:`.trainer`,
:mod:`.loop`), metrics, distributed helpers, held-out losses, sample grids and the demo report.

Import from the modules themselves (``from selfalign.training.trainer import train``): this
package imports nothing, so ``selfalign.training.distributed`` does not pull in the trainer.
"""
