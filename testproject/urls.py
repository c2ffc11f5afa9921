from __future__ import annotations

from django.urls import path

from testproject.shop import views

urlpatterns = [
    path("products/", views.product_names),
    path("notes/add/", views.add_note),
    path("async/notes/add/", views.async_add_note),
    path("async/products/first/", views.async_first_product),
]
