"""Test doubles of services that have no emulator; they never ship in the product."""
