"""Metering: who may call the factory, what they prepaid, and what each request consumed."""
