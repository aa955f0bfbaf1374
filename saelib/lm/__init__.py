"""The language-model side: loading and training the models (``models``) and harvesting, caching
and streaming their activations (``activations``)."""
