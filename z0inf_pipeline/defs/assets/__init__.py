"""One module per stage, in flow order: training run -> loss tables -> Gram -> self-influence ->
train-test top-k -> review queue -> curated training set -> retrained run -> model promotion."""

from .curation import curated_training_set
from .gram import weight_gram
from .loss_tables import loss_tables
from .promotion import model_promotion
from .retraining import retrained_run
from .review import review_queue
from .self_influence import self_influence
from .topk import train_test_influence
from .training import training_run

INFLUENCE_ASSETS = [training_run, loss_tables, weight_gram, self_influence, train_test_influence, review_queue]
RETRAIN_ASSETS = [review_queue, curated_training_set, retrained_run, model_promotion]
ALL_ASSETS = [*INFLUENCE_ASSETS, curated_training_set, retrained_run, model_promotion]
