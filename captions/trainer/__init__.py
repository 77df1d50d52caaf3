"""Caption decoders (rnn, lstm, attn) and the trainer that fits them from a feature cache."""
