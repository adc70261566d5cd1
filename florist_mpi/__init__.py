"""florist_mpi: MPI-based simulator for federated LoRA fine-tuning with FLoRIST."""

__version__ = "0.1.0"
