"""The FAISS index: its type chosen, built in bounded memory, tuned, loaded and updated."""
