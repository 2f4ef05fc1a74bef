from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("customizations", "0002_adapter_label"),
    ]

    operations = [
        migrations.AddField(
            model_name="finetuningjob",
            name="kind",
            field=models.CharField(default="carry_on", max_length=16),
        ),
        migrations.AddField(
            model_name="finetuningjob",
            name="preset",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.AddField(
            model_name="finetuningjob",
            name="tail",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AddField(
            model_name="adapter",
            name="kind",
            field=models.CharField(default="carry_on", max_length=16),
        ),
        migrations.AddField(
            model_name="adapter",
            name="preset",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.AddField(
            model_name="adapter",
            name="depth",
            field=models.IntegerField(blank=True, null=True),
        ),
    ]
