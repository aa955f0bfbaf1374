"""The SAE core: what an SAE and a transcoder are (``sae``, ``transcoder``), how they train
(``train``, ``train_parts``, ``penalties``, ``matryoshka``, ``distributed``), the one
definition of each quantity they are judged by (``metrics``, ``normalisation``) and how they are
saved (``persistence``). Imports nothing from the other subpackages except the corpus cache
folder (``persistence.load_or_train``)."""
