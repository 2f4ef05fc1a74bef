from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("customizations", "0003_tail_kind"),
    ]

    operations = [
        migrations.AddField(
            model_name="finetuningjob",
            name="requeues",
            field=models.IntegerField(default=0),
        ),
    ]
