"""HTS-AT (Hierarchical Token-Semantic Audio Transformer) for Hugging Face Transformers.

Importing the package registers HTS-AT with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForAudioClassification`, `AutoModelForAudioFrameClassification`, `AutoFeatureExtractor`), and its CPU
inference engine (`htsat_hf.engine`; `HTSAT_HF_ENGINE=0` leaves it out).
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForAudioFrameClassification,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_htsat import HTSATConfig
from .configuration_htsat_clap import HTSATClapConfig
from .configuration_htsat_ensemble import HTSATEnsembleConfig
from .feature_extraction_htsat import HTSATFeatureExtractor
from .feature_extraction_htsat_clap import HTSATClapFeatureExtractor
from .modeling_htsat import (
    HTSATForAudioClassification,
    HTSATForSoundEventDetection,
    HTSATModel,
    HTSATPreTrainedModel,
)
from .modeling_htsat_clap import HTSATClapModel, text_query_model
from .modeling_htsat_ensemble import HTSATEnsembleModel
from .engine import register as register_cpu_engine
from .classification_pipeline import HTSATAudioClassificationPipeline
from .classification_pipeline import install as install_audio_classification_pipeline
from .pipeline_htsat import SoundEventDetectionPipeline
from .pipeline_htsat_clap import HTSATZeroShotAudioClassificationPipeline
from .pipeline_htsat_clap import install as install_zero_shot_audio_classification_pipeline

__version__ = "0.1.0"

register_cpu_engine()  # HTS-AT models built or loaded from here on get the CPU engine (`htsat_hf.engine`)

AutoConfig.register(HTSATConfig.model_type, HTSATConfig, exist_ok=True)
AutoModel.register(HTSATConfig, HTSATModel, exist_ok=True)
AutoModelForAudioClassification.register(HTSATConfig, HTSATForAudioClassification, exist_ok=True)
AutoModelForAudioFrameClassification.register(HTSATConfig, HTSATForSoundEventDetection, exist_ok=True)
AutoFeatureExtractor.register(HTSATConfig, HTSATFeatureExtractor, exist_ok=True)
AutoConfig.register(HTSATEnsembleConfig.model_type, HTSATEnsembleConfig, exist_ok=True)
for auto_class in (AutoModel, AutoModelForAudioClassification, AutoModelForAudioFrameClassification):
    auto_class.register(HTSATEnsembleConfig, HTSATEnsembleModel, exist_ok=True)
AutoFeatureExtractor.register(HTSATEnsembleConfig, HTSATFeatureExtractor, exist_ok=True)
# CLAP with an HTS-AT audio tower: AutoModel, and AutoModelForAudioFrameClassification so that
# pipeline("sound-event-detection", model=clap_folder, candidate_labels=[...]) loads it
AutoConfig.register(HTSATClapConfig.model_type, HTSATClapConfig, exist_ok=True)
AutoModel.register(HTSATClapConfig, HTSATClapModel, exist_ok=True)
AutoModelForAudioFrameClassification.register(HTSATClapConfig, HTSATClapModel, exist_ok=True)
AutoFeatureExtractor.register(HTSATClapConfig, HTSATClapFeatureExtractor, exist_ok=True)
install_audio_classification_pipeline()
install_zero_shot_audio_classification_pipeline()
PIPELINE_REGISTRY.register_pipeline(
    "sound-event-detection",
    pipeline_class=SoundEventDetectionPipeline,
    pt_model=AutoModelForAudioFrameClassification,
    type="audio",
)

__all__ = [
    "HTSATAudioClassificationPipeline",
    "HTSATClapConfig",
    "HTSATClapFeatureExtractor",
    "HTSATClapModel",
    "HTSATConfig",
    "HTSATEnsembleConfig",
    "HTSATEnsembleModel",
    "HTSATFeatureExtractor",
    "HTSATForAudioClassification",
    "HTSATForSoundEventDetection",
    "HTSATModel",
    "HTSATPreTrainedModel",
    "HTSATZeroShotAudioClassificationPipeline",
    "SoundEventDetectionPipeline",
    "text_query_model",
]
