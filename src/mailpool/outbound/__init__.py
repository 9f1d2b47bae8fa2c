"""Outbound mail (the SMTP client side): pure delivery policy and the code that runs it."""
