"""Evaluation: sampling to ADM .npz, FID/sFID/IS/precision/recall, in-domain metrics, representation analysis.

Modules (import them directly; the package itself imports none of them):

* :mod:`.inception`, :mod:`.inception_layers` -- the TF-FID Inception-v3, its exact preprocessing,
  and its weights rebuilt with folded batch norm for a fast channels-last forward;
* :mod:`.fid` -- Frechet distance, Inception Score, ADM reference batches;
* :mod:`.precision_recall` -- ADM's k-NN manifold precision/recall;
* :mod:`.images` -- image sources (.npz, folders, Fashion-MNIST);
* :mod:`.metrics` -- the whole ADM suite on an image source;
* :mod:`.generate` -- index-split, resumable sampling to .npz;
* :mod:`.reference` -- reference statistics of a training image folder, cached beside it;
* :mod:`.indomain` -- Fashion-MNIST classifier metrics (the classifier itself is
  :mod:`selfalign.models.classifier`); :mod:`.training_eval` -- the metrics of a model during
  training, for any dataset;
* :mod:`.heldout`, :mod:`.report` -- denoising loss on fixed images, the comparison report of runs;
* :mod:`.features`, :mod:`.probe`, :mod:`.pca`, :mod:`.analysis` -- probing, CKNNA, PCA maps;
* :mod:`.figures` -- matplotlib figures saved as files.
"""
