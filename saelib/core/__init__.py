"""The SAE core: what an SAE and a transcoder are (``sae``, ``transcoder``), how they train
(``train``, ``train_config``, ``data_streams``, ``train_parts``, ``penalties``, ``matryoshka``,
``distributed``, ``precision``, ``allocator``), the one
definition of each quantity they are judged by (``metrics``, ``normalisation``) and how they are
saved (``persistence``, over the shared file and cache I/O of ``io``). Imports nothing from the
other subpackages."""
