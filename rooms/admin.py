from django.contrib import admin

from rooms.models import Message, Nickname, Presence, Room


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


@admin.register(Nickname)
class NicknameAdmin(admin.ModelAdmin):
    list_display = ["name", "first_seen", "last_seen"]
    search_fields = ["name"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "room", "author", "text", "created_at"]
    list_filter = ["room"]
    search_fields = ["author", "text"]
    list_select_related = ["room"]


@admin.register(Presence)
class PresenceAdmin(admin.ModelAdmin):
    list_display = ["nick", "room", "worker", "joined_at", "last_heartbeat"]
    list_filter = ["room", "worker"]
    search_fields = ["nick"]
    list_select_related = ["room"]
