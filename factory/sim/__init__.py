"""The cluster simulator (`factory sim`): a fleet of GPUs at engine-step granularity, its truth taken
from an energy profile, driven by the same policy code as the runtime (factory/policy/)."""
