"""Evaluation: sampling to ADM .npz, FID/sFID/IS/precision/recall, in-domain metrics, representation analysis.

Modules (import them directly; the package itself imports none of them):

* :mod:`.inception` -- the TF-FID Inception-v3 and its exact preprocessing;
* :mod:`.fid` -- Frechet distance, Inception Score, ADM reference batches;
* :mod:`.precision_recall` -- ADM's k-NN manifold precision/recall;
* :mod:`.images` -- image sources (.npz, folders, Fashion-MNIST);
* :mod:`.metrics` -- the whole ADM suite on an image source;
* :mod:`.generate` -- index-split, resumable sampling to .npz;
* :mod:`.indomain`, :mod:`.training_eval` -- Fashion-MNIST in-domain metrics (the classifier
  itself is :mod:`selfalign.models.classifier`);
* :mod:`.features`, :mod:`.probe`, :mod:`.pca`, :mod:`.analysis` -- probing, CKNNA, PCA maps;
* :mod:`.figures` -- matplotlib figures saved as files.
"""
