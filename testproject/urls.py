from __future__ import annotations

from django.urls import path

from testproject.shop.views import product_names

urlpatterns = [path("products/", product_names)]
