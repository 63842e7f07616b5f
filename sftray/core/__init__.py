"""What training and evaluation share: the forward pass, the masked token loss, and FSDP2/DDP wrapping."""
