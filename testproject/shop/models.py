from __future__ import annotations

from django.db import models


class Category(models.Model):
    name = models.CharField(max_length=50, unique=True)


class Product(models.Model):
    name = models.CharField(max_length=100)
    sku = models.CharField(max_length=32, default="")
    category = models.ForeignKey(Category, null=True, on_delete=models.SET_NULL)
    price_cents = models.IntegerField(default=0)
