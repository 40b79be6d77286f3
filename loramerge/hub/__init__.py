"""Publishing: model cards and pushing outputs to the Hugging Face Hub (downloads live in ``loramerge.io.hub``)."""
