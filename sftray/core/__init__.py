"""What training and evaluation share: the forward pass, the masked token loss, FSDP2/DDP wrapping, the precision
choice, and reading a prepared split's rows back."""
